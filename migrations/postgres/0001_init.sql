-- tollgate's ledger, PostgreSQL flavour: the same tables as migrations/sqlite, with BIGINT
-- for every integer so both backends decode them as i64. Money is integer nano-dollars;
-- times are Unix milliseconds (UTC). Only src/ledger/ reads or writes these tables.

CREATE TABLE teams (
    name          TEXT PRIMARY KEY,
    limit_nano    BIGINT,
    period        TEXT NOT NULL DEFAULT 'monthly',
    downgrade_at  DOUBLE PRECISION,
    models        TEXT NOT NULL DEFAULT '[]',
    rpm           BIGINT,
    tpm           BIGINT,
    created_ms    BIGINT NOT NULL
);

CREATE TABLE keys (
    id            TEXT PRIMARY KEY,
    team          TEXT NOT NULL,
    name          TEXT NOT NULL,
    key_hash      TEXT NOT NULL UNIQUE,
    prefix        TEXT NOT NULL,
    limit_nano    BIGINT,
    period        TEXT NOT NULL DEFAULT 'monthly',
    downgrade_at  DOUBLE PRECISION,
    models        TEXT NOT NULL DEFAULT '[]',
    rpm           BIGINT,
    tpm           BIGINT,
    created_ms    BIGINT NOT NULL,
    revoked_ms    BIGINT
);
CREATE INDEX keys_team ON keys(team);

CREATE TABLE requests (
    request_id          TEXT PRIMARY KEY,
    time_ms             BIGINT NOT NULL,
    key_id              TEXT NOT NULL,
    team                TEXT NOT NULL,
    endpoint            TEXT NOT NULL,
    model               TEXT NOT NULL,
    served_model        TEXT NOT NULL,
    input_tokens        BIGINT NOT NULL,
    cached_input_tokens BIGINT NOT NULL,
    output_tokens       BIGINT NOT NULL,
    cost_nano           BIGINT NOT NULL,
    usage_source        TEXT NOT NULL,
    status              BIGINT NOT NULL,
    latency_ms          BIGINT NOT NULL,
    stream              BOOLEAN NOT NULL
);
CREATE INDEX requests_time ON requests(time_ms);
CREATE INDEX requests_team_time ON requests(team, time_ms);
CREATE INDEX requests_key_time ON requests(key_id, time_ms);

CREATE TABLE directory_version (
    id       BIGINT PRIMARY KEY CHECK (id = 1),
    version  BIGINT NOT NULL
);
INSERT INTO directory_version (id, version) VALUES (1, 0);
