-- tollgate's ledger, SQLite flavour. Money is integer nano-dollars (1e-9 USD); times are
-- Unix milliseconds (UTC). Only src/ledger/ reads or writes these tables.

-- Teams own keys and may carry a budget. limit_nano NULL = no budget.
CREATE TABLE teams (
    name          TEXT PRIMARY KEY,
    limit_nano    INTEGER,
    period        TEXT NOT NULL DEFAULT 'monthly',   -- daily | weekly | monthly | total
    downgrade_at  REAL,                              -- fraction of limit, e.g. 0.8
    models        TEXT NOT NULL DEFAULT '[]',        -- JSON allow-list; [] = every model
    rpm           INTEGER,
    tpm           INTEGER,
    created_ms    INTEGER NOT NULL
);

-- Virtual keys. The secret itself is never stored: only its SHA-256 (hex) and a display prefix.
CREATE TABLE keys (
    id            TEXT PRIMARY KEY,
    team          TEXT NOT NULL,
    name          TEXT NOT NULL,
    key_hash      TEXT NOT NULL UNIQUE,
    prefix        TEXT NOT NULL,
    limit_nano    INTEGER,
    period        TEXT NOT NULL DEFAULT 'monthly',
    downgrade_at  REAL,
    models        TEXT NOT NULL DEFAULT '[]',
    rpm           INTEGER,
    tpm           INTEGER,
    created_ms    INTEGER NOT NULL,
    revoked_ms    INTEGER
);
CREATE INDEX keys_team ON keys(team);

-- One row per request forwarded to an upstream. request_id starts with the start time in hex,
-- so its order is time order and it doubles as the pagination cursor.
CREATE TABLE requests (
    request_id          TEXT PRIMARY KEY,
    time_ms             INTEGER NOT NULL,
    key_id              TEXT NOT NULL,
    team                TEXT NOT NULL,
    endpoint            TEXT NOT NULL,
    model               TEXT NOT NULL,      -- asked for
    served_model        TEXT NOT NULL,      -- actually used (after downgrade / fallback)
    input_tokens        INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    output_tokens       INTEGER NOT NULL,
    cost_nano           INTEGER NOT NULL,
    usage_source        TEXT NOT NULL,      -- reported | estimated
    status              INTEGER NOT NULL,   -- HTTP status the client received
    latency_ms          INTEGER NOT NULL,
    stream              INTEGER NOT NULL
);
CREATE INDEX requests_time ON requests(time_ms);
CREATE INDEX requests_team_time ON requests(team, time_ms);
CREATE INDEX requests_key_time ON requests(key_id, time_ms);

-- Bumped on every change to teams or keys, so a running server (polling it) sees changes
-- made by the CLI in another process, e.g. a revocation, within its poll interval.
CREATE TABLE directory_version (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    version  INTEGER NOT NULL
);
INSERT INTO directory_version (id, version) VALUES (1, 0);
