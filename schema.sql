-- jobledger schema. Applied idempotently at every start (see ledger/database.py), under an advisory lock,
-- so every statement here must be safe to run again. The schema version is recorded in
-- jobledger_schema; a service refuses to start against a database whose version is newer than its own.
--
-- The invariants that matter are enforced here, by PostgreSQL, not by Python:
--   * events, event_positions: append-only (UPDATE, DELETE, TRUNCATE raise, whoever asks);
--   * per job: versions 1, 2, 3, ... with no gaps, each event's prev_hash equal to the previous event's hash,
--     recorded_at never going backwards;
--   * global positions 1, 2, 3, ... with no gaps, each event sequenced at most once, chain hashes linked,
--     written only under the current, unexpired sequencer lease epoch (fencing);
--   * submit_id unique per owner; one read-model row per job.

CREATE TABLE IF NOT EXISTS jobledger_schema (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version    integer NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- ---------------------------------------------------------------------------------------------------------
-- Users, API clients, tokens
-- ---------------------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS users (
    uuid       text PRIMARY KEY CHECK (uuid ~ '^[0-9a-z]{5}-tpzed-[0-9a-z]{15}$'),
    name       text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    role       text NOT NULL CHECK (role IN ('user', 'auditor', 'dispatcher', 'admin')),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE IF NOT EXISTS api_clients (
    uuid       text PRIMARY KEY CHECK (uuid ~ '^[0-9a-z]{5}-ozdt8-[0-9a-z]{15}$'),
    name       text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Only a SHA-256 of each token is stored; the secret is shown once, when the token is made.
CREATE TABLE IF NOT EXISTS api_tokens (
    uuid            text PRIMARY KEY CHECK (uuid ~ '^[0-9a-z]{5}-gj3su-[0-9a-z]{15}$'),
    token_sha256    bytea NOT NULL UNIQUE CHECK (length(token_sha256) = 32),
    user_uuid       text NOT NULL REFERENCES users (uuid),
    api_client_uuid text REFERENCES api_clients (uuid),
    read_only       boolean NOT NULL DEFAULT false,
    expires_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- ---------------------------------------------------------------------------------------------------------
-- The events: the truth. One row per event, never changed.
-- ---------------------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS events (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_uuid          text NOT NULL CHECK (job_uuid ~ '^[0-9a-z]{5}-8i9sb-[0-9a-z]{15}$'),
    version           integer NOT NULL CHECK (version >= 1),
    event_type        text NOT NULL CHECK (event_type IN
                          ('submitted', 'updated', 'locked', 'unlocked', 'started', 'cancelled', 'finished',
                           'reused')),
    data              jsonb NOT NULL CHECK (jsonb_typeof(data) = 'object'),
    actor_user_uuid   text NOT NULL,
    actor_client_uuid text,
    request_id        text NOT NULL,
    -- Server time chosen by the appender (never earlier than the job's previous event; the trigger checks).
    recorded_at       timestamptz NOT NULL,
    prev_hash         text NOT NULL CHECK (prev_hash ~ '^[0-9a-f]{64}$'),
    hash              text NOT NULL CHECK (hash ~ '^[0-9a-f]{64}$'),
    -- The 64-bit, epoch-extended id of the appending transaction. The sequencer orders by (tx, id) and only
    -- sequences rows of transactions older than every running one, so no commit can slip in behind it.
    tx                bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    CONSTRAINT events_job_version_key UNIQUE (job_uuid, version)
);
CREATE INDEX IF NOT EXISTS events_tx_id ON events (tx, id);
CREATE INDEX IF NOT EXISTS events_job_recorded_at ON events (job_uuid, recorded_at, version);
CREATE INDEX IF NOT EXISTS events_reused_submit_id ON events (actor_user_uuid, (data->>'submit_id')) WHERE event_type = 'reused';

-- Global order: the sequencer appends one row per event, position 1, 2, 3, ... in commit order.
CREATE TABLE IF NOT EXISTS event_positions (
    position     bigint PRIMARY KEY CHECK (position >= 1),
    event_id     bigint NOT NULL UNIQUE REFERENCES events (id),
    chain_hash   text NOT NULL CHECK (chain_hash ~ '^[0-9a-f]{64}$'),
    sequenced_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- The sequencer lease epoch under which the row was written (NULL: written before leases existed).
    epoch        bigint
);
-- Databases made before the lease: the column is added empty (no rewrite, the append-only trigger is not hit).
ALTER TABLE event_positions ADD COLUMN IF NOT EXISTS epoch bigint;

CREATE OR REPLACE FUNCTION jobledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege', HINT = 'the ledger never changes or deletes an event';
END $$;

CREATE OR REPLACE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE ON events FOR EACH ROW EXECUTE FUNCTION jobledger_refuse_change();
CREATE OR REPLACE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events FOR EACH STATEMENT EXECUTE FUNCTION jobledger_refuse_change();
CREATE OR REPLACE TRIGGER event_positions_append_only
    BEFORE UPDATE OR DELETE ON event_positions FOR EACH ROW EXECUTE FUNCTION jobledger_refuse_change();
CREATE OR REPLACE TRIGGER event_positions_no_truncate
    BEFORE TRUNCATE ON event_positions FOR EACH STATEMENT EXECUTE FUNCTION jobledger_refuse_change();
REVOKE UPDATE, DELETE, TRUNCATE ON events, event_positions FROM PUBLIC;

-- The sequencer lease: one row. The leader must keep renewing it (expires_at, by the database's clock only);
-- a takeover bumps epoch, the fencing token. Every batch of positions carries the epoch it was sequenced
-- under, and the trigger below refuses a batch whose epoch is not the current, unexpired one, so a leader
-- that was frozen, partitioned or stuck past its lease can never write another position (ledger/sequencer.py).
CREATE TABLE IF NOT EXISTS sequencer_lease (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    holder      text,
    -- The holder's backend: a follower may take over at once when that session no longer exists.
    holder_pid  integer,
    epoch       bigint NOT NULL DEFAULT 0 CHECK (epoch >= 0),
    acquired_at timestamptz,
    renewed_at  timestamptz,
    expires_at  timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO sequencer_lease (singleton) VALUES (true) ON CONFLICT (singleton) DO NOTHING;

-- The lease row is never deleted, and its epoch never goes back (a reused token would unfence a stale leader).
CREATE OR REPLACE FUNCTION jobledger_check_lease_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.epoch < OLD.epoch THEN
        RAISE EXCEPTION 'sequencer lease epoch may not go back from % to %', OLD.epoch, NEW.epoch
            USING ERRCODE = 'check_violation', CONSTRAINT = 'sequencer_lease_epoch';
    END IF;
    RETURN NEW;
END $$;

CREATE OR REPLACE TRIGGER sequencer_lease_epoch
    BEFORE UPDATE ON sequencer_lease FOR EACH ROW EXECUTE FUNCTION jobledger_check_lease_update();
CREATE OR REPLACE TRIGGER sequencer_lease_no_delete
    BEFORE DELETE ON sequencer_lease FOR EACH ROW EXECUTE FUNCTION jobledger_refuse_change();
CREATE OR REPLACE TRIGGER sequencer_lease_no_truncate
    BEFORE TRUNCATE ON sequencer_lease FOR EACH STATEMENT EXECUTE FUNCTION jobledger_refuse_change();
REVOKE DELETE, TRUNCATE ON sequencer_lease FROM PUBLIC;

-- Fencing: positions may only be written under the current lease, before it expires. The lease row is read
-- FOR SHARE, so a takeover (an UPDATE of that row) waits until this transaction ends, and a batch that got
-- here first commits before the new leader reads the head. clock_timestamp(), not now(): a transaction that
-- began long ago must not pass with its start time.
CREATE OR REPLACE FUNCTION jobledger_check_sequencer_epoch() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    lease record;
    stale bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM inserted) THEN
        RETURN NULL;
    END IF;
    SELECT epoch, expires_at INTO lease FROM sequencer_lease WHERE singleton FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no sequencer lease row' USING ERRCODE = 'check_violation', CONSTRAINT = 'event_positions_fenced';
    END IF;
    SELECT epoch INTO stale FROM inserted WHERE epoch IS DISTINCT FROM lease.epoch LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'positions sequenced under epoch % refused: the sequencer lease is at epoch %', stale, lease.epoch
            USING ERRCODE = 'check_violation', CONSTRAINT = 'event_positions_fenced',
                  HINT = 'this process lost the sequencer lease; another one leads';
    END IF;
    IF lease.expires_at <= clock_timestamp() THEN
        RAISE EXCEPTION 'positions refused: the sequencer lease of epoch % expired at %', lease.epoch, lease.expires_at
            USING ERRCODE = 'check_violation', CONSTRAINT = 'event_positions_fenced';
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER event_positions_fenced
    AFTER INSERT ON event_positions REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION jobledger_check_sequencer_epoch();

-- Each job's events form a chain: version n+1 follows version n, links to its hash, and is not older.
-- Two appenders racing for the same version both pass this check; the unique key then picks one.
CREATE OR REPLACE FUNCTION jobledger_check_job_chain() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    prev record;
BEGIN
    IF NEW.version = 1 THEN
        IF NEW.prev_hash <> repeat('0', 64) THEN
            RAISE EXCEPTION 'event 1 of job % must link to the genesis hash', NEW.job_uuid
                USING ERRCODE = 'check_violation', CONSTRAINT = 'events_job_chain';
        END IF;
        RETURN NEW;
    END IF;
    SELECT hash, recorded_at, version INTO prev FROM events WHERE job_uuid = NEW.job_uuid AND version = NEW.version - 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'event % of job % has no predecessor', NEW.version, NEW.job_uuid
            USING ERRCODE = 'check_violation', CONSTRAINT = 'events_job_chain';
    END IF;
    IF NEW.prev_hash <> prev.hash THEN
        RAISE EXCEPTION 'event % of job % does not link to the hash of event %', NEW.version, NEW.job_uuid,
            prev.version USING ERRCODE = 'check_violation', CONSTRAINT = 'events_job_chain';
    END IF;
    IF NEW.recorded_at < prev.recorded_at THEN
        RAISE EXCEPTION 'event % of job % is older than event %', NEW.version, NEW.job_uuid, prev.version
            USING ERRCODE = 'check_violation', CONSTRAINT = 'events_job_time';
    END IF;
    RETURN NEW;
END $$;

CREATE OR REPLACE TRIGGER events_job_chain
    BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION jobledger_check_job_chain();

-- The global chain: position p links to position p-1, and positions have no holes.
CREATE OR REPLACE FUNCTION jobledger_check_position() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.position > 1 AND NOT EXISTS (SELECT 1 FROM event_positions WHERE position = NEW.position - 1) THEN
        RAISE EXCEPTION 'position % has no predecessor', NEW.position
            USING ERRCODE = 'check_violation', CONSTRAINT = 'event_positions_dense';
    END IF;
    RETURN NEW;
END $$;

CREATE OR REPLACE TRIGGER event_positions_dense
    BEFORE INSERT ON event_positions FOR EACH ROW EXECUTE FUNCTION jobledger_check_position();

-- ---------------------------------------------------------------------------------------------------------
-- The read model: the current state of every job, the fold of its events, written in the same transaction
-- as the events it folds. `rebuild` recomputes it from the events alone.
-- ---------------------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS jobs (
    uuid                     text PRIMARY KEY,
    owner_uuid               text NOT NULL,
    created_at               timestamptz NOT NULL,
    modified_at              timestamptz NOT NULL,
    modified_by_user_uuid    text NOT NULL,
    modified_by_client_uuid  text,
    submit_id                text,
    priority                 integer NOT NULL,
    resource_limits          jsonb NOT NULL,
    script_name              text NOT NULL,
    script_parameters        jsonb NOT NULL,
    script_parameters_digest text NOT NULL,
    script_version           text NOT NULL,
    supplied_script_version  text NOT NULL,
    cancelled_by_client      text,
    cancelled_by_user        text,
    cancelled_at             timestamptz,
    started_at               timestamptz,
    finished_at              timestamptz,
    running                  boolean NOT NULL,
    success                  boolean,
    is_locked_by             text,
    state                    text NOT NULL CHECK (state IN ('Queued', 'Running', 'Complete', 'Failed', 'Cancelled')),
    output                   text,
    log                      text,
    version                  integer NOT NULL CHECK (version >= 1),
    etag                     text NOT NULL,
    -- What the next append must chain onto: the hash and time of the job's latest event.
    last_hash                text NOT NULL,
    last_recorded_at         timestamptz NOT NULL
);
-- submit_id is unique per owner: two racing creates with one submit_id make one job.
CREATE UNIQUE INDEX IF NOT EXISTS jobs_owner_submit_id ON jobs (owner_uuid, submit_id) WHERE submit_id IS NOT NULL;
-- The default list order, and paging through it.
CREATE INDEX IF NOT EXISTS jobs_modified_at ON jobs (modified_at DESC, uuid);
CREATE INDEX IF NOT EXISTS jobs_owner_modified_at ON jobs (owner_uuid, modified_at DESC, uuid);
-- The dispatch queue.
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (priority DESC, created_at, uuid)
    WHERE state = 'Queued' AND is_locked_by IS NULL;
-- Finding an identical job to reuse (CONTRACT §4) without a scan.
CREATE INDEX IF NOT EXISTS jobs_identity ON jobs (script_name, script_parameters_digest, script_version);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, modified_at DESC);
