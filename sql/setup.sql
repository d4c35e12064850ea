-- rolegate: a least-privilege control role for proxy-side authentication.
--
-- Run as a superuser, in the database that [control] dsn names (usually
-- postgres):
--
--   psql -v ON_ERROR_STOP=1 -U postgres -d postgres -f sql/setup.sql
--
-- Running it again is harmless: it creates what is missing and resets
-- what it owns to the state below.
--
-- It creates:
--   * role rolegate (LOGIN, not superuser), a member of pg_signal_backend
--     (terminate non-superuser sessions to make room under a limit) and
--     pg_read_all_stats (see every role's rows in pg_stat_activity);
--   * schema rolegate with one function, rolegate.get_secret(role_name),
--     SECURITY DEFINER and owned by the superuser running this file, that
--     returns one role's stored password verifier. Only rolegate may call it;
--   * table rolegate.events, the eviction history every rolegate instance
--     writes its evictions, rejections and kills to and reads back (SHOW
--     EVICTIONS, /api/evictions, the live page). rolegate may insert, read
--     and delete its rows (it deletes those older than [history] keep), and
--     nothing else.
--
-- No password is set here. Give the role one, and hand it to rolegate in the
-- environment (ROLEGATE_CONTROL_PASSWORD) or a file ([control] password_file):
--
--   \password rolegate                      (in psql; the password is not logged)
--   ALTER ROLE rolegate PASSWORD '...';     (the statement may reach the server log)
--
-- Then, in proxy.toml:
--
--   [control]
--   dsn = "postgres://rolegate@db.example:5432/postgres"
--   [auth]
--   auth_query = "SELECT rolegate.get_secret($1)"
--
-- The verifiers this function returns are secrets: a SCRAM verifier lets its
-- holder pose as the server to that role's clients, and an md5 hash is as
-- good as the password for md5 logins. Guard the rolegate role's password
-- like a superuser's.

-- The function below reads pg_authid with its owner's rights, so its owner,
-- the user running this file, must be a superuser.
DO $$
BEGIN
    IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        RAISE EXCEPTION 'sql/setup.sql must be run by a superuser, not by %', current_user;
    END IF;
END
$$;

-- The control role. CREATE ROLE has no IF NOT EXISTS.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'rolegate') THEN
        CREATE ROLE rolegate LOGIN;
    END IF;
END
$$;
-- Whatever an earlier set-up left, the role is an ordinary login role.
ALTER ROLE rolegate WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;

-- pg_signal_backend: pg_terminate_backend on non-superuser sessions.
-- pg_read_all_stats: state, query start and client of every session in
-- pg_stat_activity, not only rolegate's own.
GRANT pg_signal_backend, pg_read_all_stats TO rolegate;

-- The schema belongs to the superuser running this file, so that rolegate
-- cannot put objects into it; rolegate may only look things up in it.
CREATE SCHEMA IF NOT EXISTS rolegate;
ALTER SCHEMA rolegate OWNER TO CURRENT_USER;
REVOKE ALL ON SCHEMA rolegate FROM PUBLIC;
GRANT USAGE ON SCHEMA rolegate TO rolegate;

-- One role's verifier: pg_authid.rolpassword, readable only by superusers,
-- hence SECURITY DEFINER. Its search_path is fixed so that no object a
-- caller creates can stand in for a catalog. It returns no row for a role
-- that does not exist and a NULL for a role without a password, so that
-- rolegate's log can tell the two apart (the client is told the same
-- "password authentication failed" either way). NOLOGIN roles are returned
-- too: the server then refuses them with its own error.
--
-- To keep superusers' verifiers out of rolegate's reach (they then cannot
-- log in through rolegate in proxy mode), add "AND NOT rolsuper" to the
-- WHERE clause.
CREATE OR REPLACE FUNCTION rolegate.get_secret(role_name text)
    RETURNS SETOF text
    LANGUAGE sql
    STABLE
    STRICT
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT rolpassword FROM pg_catalog.pg_authid WHERE rolname = role_name
$$;

ALTER FUNCTION rolegate.get_secret(text) OWNER TO CURRENT_USER;

-- Functions are executable by PUBLIC by default; only rolegate may call this one.
REVOKE ALL ON FUNCTION rolegate.get_secret(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rolegate.get_secret(text) TO rolegate;

-- The eviction history. The table belongs to the superuser running this
-- file, like the schema: rolegate may add rows, read them and delete old
-- ones, but not change the table. Columns are only ever added here, so that
-- a rolegate built for an older set-up keeps writing; running this file on
-- a server set up by an older version adds what is missing.
CREATE TABLE IF NOT EXISTS rolegate.events (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE rolegate.events
    ADD COLUMN IF NOT EXISTS instance text,
    ADD COLUMN IF NOT EXISTS kind text,          -- eviction | rejection | kill, or "dry-run eviction" | "dry-run rejection" | "dry-run wait"
    ADD COLUMN IF NOT EXISTS policy text,
    ADD COLUMN IF NOT EXISTS scope text,         -- role | database: which limit
    ADD COLUMN IF NOT EXISTS role text,          -- the login's role
    ADD COLUMN IF NOT EXISTS database text,
    ADD COLUMN IF NOT EXISTS client text,        -- the login's client address
    ADD COLUMN IF NOT EXISTS victim_pid int,
    ADD COLUMN IF NOT EXISTS victim_role text,
    ADD COLUMN IF NOT EXISTS victim_application_name text,
    ADD COLUMN IF NOT EXISTS victim_client text,
    ADD COLUMN IF NOT EXISTS victim_age interval,  -- since its backend_start
    ADD COLUMN IF NOT EXISTS victim_idle interval, -- idle for, when it was idle
    ADD COLUMN IF NOT EXISTS via_rolegate boolean,
    ADD COLUMN IF NOT EXISTS reason text;
CREATE INDEX IF NOT EXISTS events_at ON rolegate.events (at);
ALTER TABLE rolegate.events OWNER TO CURRENT_USER;

REVOKE ALL ON TABLE rolegate.events FROM PUBLIC, rolegate;
GRANT SELECT, INSERT, DELETE ON TABLE rolegate.events TO rolegate;
-- The id column's sequence: nextval for each row rolegate inserts.
DO $$
BEGIN
    EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM PUBLIC, rolegate',
        pg_catalog.pg_get_serial_sequence('rolegate.events', 'id'));
    EXECUTE format('GRANT USAGE ON SEQUENCE %s TO rolegate',
        pg_catalog.pg_get_serial_sequence('rolegate.events', 'id'));
END
$$;
