-- Request ids begin with their start time (see `ledger::new_request_id`), so the primary key's
-- index serves time ranges: a separate index on time_ms only cost a b-tree write per request.
DROP INDEX IF EXISTS requests_time;
