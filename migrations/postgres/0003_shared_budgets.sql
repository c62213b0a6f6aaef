-- Budgets and rate windows shared by every replica on this database (SPEC §8).
--
-- A limited budget of a period is one row of budget_accounts: spend settled and money held for
-- requests in flight. A reservation is one row of budget_holds, leased by the replica that took
-- it: a replica renews its lease in replicas; holds of a replica whose lease ran out are swept
-- (released, charged their floor: the prompt the upstream certainly billed). Every function
-- locks the account rows it touches in (scope, period_start) order, so no two of them deadlock.
-- Scopes are 'team:<name>' or 'key:<id>'.
--
-- These functions commit without waiting for their WAL to reach disk (synchronous_commit off
-- for their transaction): every request of a team takes that team's account row, and a flush
-- per commit under that row's lock would bound the team at one request per disk flush. A
-- database crash (not a replica's) may lose the last fraction of a second of reservations and
-- settlements, as Redis with `appendfsync everysec` does; the ledger's records are committed
-- durably as before.

CREATE TABLE budget_accounts (
    scope          TEXT NOT NULL,
    period_start   BIGINT NOT NULL,
    spent_nano     BIGINT NOT NULL,
    reserved_nano  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, period_start)
);

CREATE TABLE replicas (
    id              TEXT PRIMARY KEY,
    lease_until_ms  BIGINT NOT NULL
);

CREATE TABLE budget_holds (
    hold_id      TEXT PRIMARY KEY,
    request_id   TEXT NOT NULL,
    replica      TEXT NOT NULL,
    scopes       TEXT[] NOT NULL,
    starts       BIGINT[] NOT NULL,
    amount_nano  BIGINT NOT NULL,
    floor_nano   BIGINT NOT NULL
);
CREATE INDEX budget_holds_replica ON budget_holds(replica);

-- Holds the sweep released (their replica's lease ran out): a late settlement of one books
-- only what it cost beyond its floor, once; one of a hold never taken books nothing.
CREATE TABLE budget_swept (
    hold_id  TEXT PRIMARY KEY,
    at_ms    BIGINT NOT NULL
);

CREATE TABLE rate_scopes (
    scope  TEXT PRIMARY KEY
);

CREATE TABLE rate_events (
    scope   TEXT NOT NULL,
    ticket  TEXT NOT NULL,
    at_ms   BIGINT NOT NULL,
    tokens  BIGINT NOT NULL,
    PRIMARY KEY (scope, ticket)
);
CREATE INDEX rate_events_window ON rate_events(scope, at_ms);
CREATE INDEX rate_events_ticket ON rate_events(ticket);

-- The database's clock, Unix ms: leases are judged on one clock, not on each replica's.
CREATE FUNCTION tg_now_ms() RETURNS BIGINT LANGUAGE sql AS $$
    SELECT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT
$$;

-- Makes sure a budget's account for a period exists; a new one starts from the ledger's sum.
CREATE FUNCTION tg_budget_account(p_scope TEXT, p_start BIGINT) RETURNS VOID LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM budget_accounts WHERE scope = p_scope AND period_start = p_start) THEN
        RETURN;
    END IF;
    INSERT INTO budget_accounts (scope, period_start, spent_nano)
    SELECT p_scope, p_start, COALESCE(SUM(cost_nano), 0)::BIGINT FROM requests
     WHERE usage_source <> 'pending' AND time_ms >= p_start
       AND CASE WHEN left(p_scope, 4) = 'key:' THEN key_id = substr(p_scope, 5)
                ELSE team = substr(p_scope, 6) END
    ON CONFLICT DO NOTHING;
END $$;

-- A budget's account for a period: (spent, reserved).
CREATE FUNCTION tg_budget_status(p_scope TEXT, p_start BIGINT)
RETURNS TABLE (spent BIGINT, reserved BIGINT) LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tg_budget_account(p_scope, p_start);
    RETURN QUERY SELECT a.spent_nano, a.reserved_nano FROM budget_accounts a
                  WHERE a.scope = p_scope AND a.period_start = p_start;
END $$;

-- Reserves p_amount against every budget or none. Returns 0, or the 1-based index of the first
-- budget it does not fit with that account's spent and reserved, or -1 when p_replica's lease
-- has run out (its holds may have been swept: it must renew before it holds anything more).
CREATE FUNCTION tg_reserve(
    p_hold TEXT, p_request TEXT, p_replica TEXT,
    p_scopes TEXT[], p_starts BIGINT[], p_limits BIGINT[], p_amount BIGINT, p_floor BIGINT
) RETURNS TABLE (refused INT, spent BIGINT, reserved BIGINT) LANGUAGE plpgsql AS $$
DECLARE
    i INT;
    a budget_accounts%ROWTYPE;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    IF NOT EXISTS (SELECT 1 FROM replicas WHERE id = p_replica AND lease_until_ms >= tg_now_ms()) THEN
        RETURN QUERY SELECT -1, 0::BIGINT, 0::BIGINT;
        RETURN;
    END IF;
    FOR i IN SELECT u.ord FROM unnest(p_scopes, p_starts) WITH ORDINALITY AS u(s, st, ord) ORDER BY u.s, u.st LOOP
        PERFORM tg_budget_account(p_scopes[i], p_starts[i]);
        SELECT * INTO a FROM budget_accounts
         WHERE scope = p_scopes[i] AND period_start = p_starts[i] FOR UPDATE;
        IF a.spent_nano + a.reserved_nano + p_amount > p_limits[i] THEN
            RETURN QUERY SELECT i::INT, a.spent_nano, a.reserved_nano;
            RETURN;
        END IF;
    END LOOP;
    UPDATE budget_accounts SET reserved_nano = reserved_nano + p_amount
      FROM unnest(p_scopes, p_starts) AS u(s, st)
     WHERE scope = u.s AND period_start = u.st;
    INSERT INTO budget_holds VALUES (p_hold, p_request, p_replica, p_scopes, p_starts, p_amount, p_floor);
    RETURN QUERY SELECT 0, 0::BIGINT, 0::BIGINT;
END $$;

-- Settles reservations, one element per (hold, budget): the hold is released and its cost
-- booked. A hold swept meanwhile (its replica's lease ran out) was charged its floor: only
-- what it cost beyond that is booked, once. A hold never taken (a reservation whose answer
-- was lost) books nothing.
CREATE FUNCTION tg_settle(
    p_holds TEXT[], p_scopes TEXT[], p_starts BIGINT[], p_costs BIGINT[], p_floors BIGINT[]
) RETURNS VOID LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM 1 FROM budget_accounts a
      JOIN (SELECT DISTINCT s, st FROM unnest(p_scopes, p_starts) AS u(s, st)) k
        ON a.scope = k.s AND a.period_start = k.st
     ORDER BY a.scope, a.period_start FOR UPDATE OF a;
    WITH gone AS (
        DELETE FROM budget_holds WHERE hold_id = ANY(p_holds) RETURNING hold_id, amount_nano
    ), late AS (
        DELETE FROM budget_swept WHERE hold_id = ANY(p_holds) RETURNING hold_id
    ), d AS (
        SELECT u.s, u.st,
               SUM(COALESCE(g.amount_nano, 0)) AS release,
               SUM(CASE WHEN g.hold_id IS NOT NULL THEN u.cost
                        WHEN l.hold_id IS NOT NULL THEN GREATEST(u.cost - u.floor, 0)
                        ELSE 0 END) AS spend
          FROM unnest(p_holds, p_scopes, p_starts, p_costs, p_floors) AS u(h, s, st, cost, floor)
          LEFT JOIN gone g ON g.hold_id = u.h
          LEFT JOIN late l ON l.hold_id = u.h
         GROUP BY u.s, u.st
    )
    UPDATE budget_accounts a
       SET reserved_nano = GREATEST(a.reserved_nano - d.release, 0), spent_nano = a.spent_nano + d.spend
      FROM d WHERE a.scope = d.s AND a.period_start = d.st;
END $$;

-- Releases the holds of replicas whose lease ran out, charging each its floor, and marks their
-- requests' journal entries interrupted at that charge. Returns how many holds were swept.
CREATE FUNCTION tg_sweep() RETURNS BIGINT LANGUAGE plpgsql AS $$
DECLARE
    now_ms BIGINT := tg_now_ms();
    ids TEXT[];
    n BIGINT := 0;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    SELECT array_agg(h.hold_id) INTO ids FROM budget_holds h
     WHERE NOT EXISTS (SELECT 1 FROM replicas r WHERE r.id = h.replica AND r.lease_until_ms >= now_ms);
    IF ids IS NOT NULL THEN
        PERFORM 1 FROM budget_accounts a
          JOIN (SELECT DISTINCT u.s, u.st FROM budget_holds h, unnest(h.scopes, h.starts) AS u(s, st)
                 WHERE h.hold_id = ANY(ids)) k
            ON a.scope = k.s AND a.period_start = k.st
         ORDER BY a.scope, a.period_start FOR UPDATE OF a;
        WITH gone AS (
            DELETE FROM budget_holds h WHERE h.hold_id = ANY(ids)
               AND NOT EXISTS (SELECT 1 FROM replicas r WHERE r.id = h.replica AND r.lease_until_ms >= now_ms)
            RETURNING h.hold_id, h.request_id, h.scopes, h.starts, h.amount_nano, h.floor_nano
        ), tombstones AS (
            INSERT INTO budget_swept SELECT g.hold_id, now_ms FROM gone g ON CONFLICT DO NOTHING
            RETURNING 1
        ), per AS (
            SELECT u.s, u.st, SUM(g.amount_nano) AS release, SUM(g.floor_nano) AS spend
              FROM gone g, unnest(g.scopes, g.starts) AS u(s, st) GROUP BY u.s, u.st
        ), accounts AS (
            UPDATE budget_accounts a
               SET reserved_nano = GREATEST(a.reserved_nano - per.release, 0), spent_nano = a.spent_nano + per.spend
              FROM per WHERE a.scope = per.s AND a.period_start = per.st
            RETURNING 1
        ), entries AS (
            UPDATE requests r SET usage_source = 'interrupted', cost_nano = g.floor_nano
              FROM gone g WHERE r.request_id = g.request_id AND r.usage_source = 'pending'
            RETURNING 1
        )
        SELECT count(*) INTO n FROM gone;
    END IF;
    DELETE FROM replicas WHERE lease_until_ms < now_ms - 86400000;
    DELETE FROM budget_swept WHERE at_ms < now_ms - 86400000;
    RETURN n;
END $$;

-- Admits a request to every rate window or none (p_record false: only checks). Returns 0, or
-- the 1-based index of the refusing window, what it counts, and ms until there is room.
CREATE FUNCTION tg_rate_admit(
    p_ticket TEXT, p_scopes TEXT[], p_rpm BIGINT[], p_tpm BIGINT[], p_tokens BIGINT, p_now BIGINT, p_record BOOLEAN
) RETURNS TABLE (refused INT, what TEXT, retry_ms BIGINT) LANGUAGE plpgsql AS $$
DECLARE
    i INT;
    n BIGINT;
    t BIGINT;
    oldest BIGINT;
    room_at BIGINT;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    FOR i IN SELECT u.ord FROM unnest(p_scopes) WITH ORDINALITY AS u(s, ord) ORDER BY u.s LOOP
        INSERT INTO rate_scopes VALUES (p_scopes[i]) ON CONFLICT DO NOTHING;
        PERFORM 1 FROM rate_scopes WHERE scope = p_scopes[i] FOR UPDATE;
        SELECT count(*), COALESCE(SUM(tokens), 0)::BIGINT, MIN(at_ms) INTO n, t, oldest
          FROM rate_events WHERE scope = p_scopes[i] AND at_ms > p_now - 60000;
        IF p_rpm[i] IS NOT NULL AND n >= p_rpm[i] THEN
            RETURN QUERY SELECT i::INT, 'requests per minute'::TEXT, oldest + 60000 - p_now;
            RETURN;
        END IF;
        -- As in one process: admitted while the window has room; one request may overshoot.
        IF p_tpm[i] IS NOT NULL AND (t >= p_tpm[i] OR (t > 0 AND t + p_tokens > p_tpm[i])) THEN
            SELECT w.at_ms INTO room_at FROM (
                SELECT at_ms, t - SUM(tokens) OVER (ORDER BY at_ms, ticket) AS left_after
                  FROM rate_events WHERE scope = p_scopes[i] AND at_ms > p_now - 60000
            ) w WHERE w.left_after <= GREATEST(p_tpm[i] - p_tokens, 0) ORDER BY w.at_ms LIMIT 1;
            RETURN QUERY SELECT i::INT, 'tokens per minute'::TEXT, COALESCE(room_at, p_now) + 60000 - p_now;
            RETURN;
        END IF;
    END LOOP;
    IF p_record THEN
        INSERT INTO rate_events (scope, ticket, at_ms, tokens)
        SELECT s, p_ticket, p_now, p_tokens FROM unnest(p_scopes) AS s;
    END IF;
    RETURN QUERY SELECT 0, NULL::TEXT, 0::BIGINT;
END $$;

-- Key, team and budget changes are pushed to every replica listening on this schema's channel.
CREATE FUNCTION tg_notify_directory() RETURNS TRIGGER LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tollgate_dir_' || left(md5(current_schema()), 16), NEW.version::TEXT);
    RETURN NEW;
END $$;
CREATE TRIGGER directory_changed AFTER UPDATE ON directory_version
    FOR EACH ROW EXECUTE FUNCTION tg_notify_directory();
