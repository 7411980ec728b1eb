"""PostgreSQL server functions for the read and commit hot paths

Revision ID: 0005
Revises: 0004

A delivered read is one round trip (``agentbus_read``: fetch the head and record it in the
session's read set) instead of a six-statement transaction, and a commit is four (BEGIN,
``agentbus_commit_load``, ``agentbus_commit_apply``, COMMIT) instead of about twelve. The
functions only fetch and store: which reads conflict is still decided in Python by
``agentbus.core.validation``, between the two calls, while the space row lock is held.

Each statement inside a PL/pgSQL function takes a fresh snapshot (READ COMMITTED), so the
reads after the space row lock in ``agentbus_commit_load`` see every commit that held the
lock before us — the same ordering the statement-by-statement SQLAlchemy path relies on.
SQLite has no server functions; there this migration does nothing.
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

RECORD = """
CREATE OR REPLACE FUNCTION agentbus_record(
    p_tenant text, p_space text, p_subject text, p_session text,
    p_kind text, p_ident text, p_version bigint,
    p_prefix text, p_start_after text, p_end_at text,
    p_now double precision, p_max integer
) RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    h_n integer;
    h_overflow boolean;
    added integer;
BEGIN
    -- Create-or-lock the epoch header: orders this read against the session's own commit.
    INSERT INTO readset_epochs AS e (tenant, space, subject, session, started_at, n, overflow, gen)
    VALUES (p_tenant, p_space, p_subject, p_session, p_now, 0, false, 0)
    ON CONFLICT (tenant, space, subject, session) DO UPDATE SET gen = e.gen
    RETURNING e.n, e.overflow INTO h_n, h_overflow;
    IF h_overflow THEN
        RETURN;
    END IF;
    IF h_n >= p_max THEN
        -- Full: a key already recorded needs no entry; a new one cannot be recorded.
        PERFORM 1 FROM readset_entries r
        WHERE r.tenant = p_tenant AND r.space = p_space AND r.subject = p_subject
          AND r.session = p_session AND r.kind = p_kind AND r.ident = p_ident;
        IF NOT FOUND THEN
            UPDATE readset_epochs SET overflow = true
            WHERE tenant = p_tenant AND space = p_space AND subject = p_subject AND session = p_session;
        END IF;
        RETURN;
    END IF;
    INSERT INTO readset_entries (tenant, space, subject, session, kind, ident, prefix, start_after, end_at, version)
    VALUES (p_tenant, p_space, p_subject, p_session, p_kind, p_ident, p_prefix, p_start_after, p_end_at, p_version)
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS added = ROW_COUNT;
    IF added = 1 THEN
        UPDATE readset_epochs SET n = n + 1, gen = gen + 1
        WHERE tenant = p_tenant AND space = p_space AND subject = p_subject AND session = p_session;
    END IF;
END
$fn$;
"""

READ = """
CREATE OR REPLACE FUNCTION agentbus_read(
    p_tenant text, p_space text, p_subject text, p_session text, p_key text,
    p_now double precision, p_max integer
) RETURNS TABLE (
    o_found boolean, o_version bigint, o_value text, o_deleted boolean,
    o_seq bigint, o_updated_by text, o_updated_at double precision
) LANGUAGE plpgsql AS $fn$
DECLARE
    h record;
BEGIN
    SELECT s.version, s.value, s.deleted, s.seq, s.updated_by, s.updated_at INTO h
    FROM shards s WHERE s.tenant = p_tenant AND s.space = p_space AND s.key = p_key;
    IF FOUND THEN
        PERFORM agentbus_record(p_tenant, p_space, p_subject, p_session, 'p', p_key, h.version,
                                NULL, NULL, NULL, p_now, p_max);
        RETURN QUERY SELECT true, h.version, h.value, h.deleted, h.seq, h.updated_by, h.updated_at;
    ELSE
        PERFORM agentbus_record(p_tenant, p_space, p_subject, p_session, 'p', p_key, 0::bigint,
                                NULL, NULL, NULL, p_now, p_max);
        RETURN QUERY SELECT false, 0::bigint, NULL::text, false, 0::bigint, NULL::text, 0::double precision;
    END IF;
END
$fn$;
"""

COMMIT_LOAD = """
CREATE OR REPLACE FUNCTION agentbus_commit_load(
    p_tenant text, p_space text, p_subject text, p_session text,
    p_keys text[], p_idem text, p_now double precision
) RETURNS TABLE (o_seq bigint, o_idem text, o_epoch text, o_heads text, o_changed text)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_seq bigint;
    v_idem text;
    v_epoch text;
    v_heads text;
    v_changed text;
    v_floor bigint;
    v_started double precision;
    v_overflow boolean;
    v_gen bigint;
BEGIN
    -- The space row lock orders every commit of the space; everything below runs after it.
    INSERT INTO spaces AS s (tenant, space, seq, created_at) VALUES (p_tenant, p_space, 0, p_now)
    ON CONFLICT (tenant, space) DO UPDATE SET seq = s.seq
    RETURNING s.seq INTO v_seq;

    IF p_idem IS NOT NULL THEN
        SELECT json_build_array(i.fingerprint, i.status, i.body, i.created_at)::text INTO v_idem
        FROM idempotency i
        WHERE i.tenant = p_tenant AND i.space = p_space AND i.subject = p_subject AND i.idem_key = p_idem;
    END IF;

    SELECT e.started_at, e.overflow, e.gen INTO v_started, v_overflow, v_gen
    FROM readset_epochs e
    WHERE e.tenant = p_tenant AND e.space = p_space AND e.subject = p_subject AND e.session = p_session
    FOR UPDATE;
    IF FOUND THEN
        SELECT json_build_array(v_started, v_overflow, v_gen, coalesce(json_agg(
                   json_build_array(r.kind, r.ident, r.version, r.prefix, r.start_after, r.end_at)), '[]'))::text,
               min(r.version) FILTER (WHERE r.kind = 'r')
          INTO v_epoch, v_floor
        FROM readset_entries r
        WHERE r.tenant = p_tenant AND r.space = p_space AND r.subject = p_subject AND r.session = p_session;
    END IF;

    SELECT coalesce(json_agg(
               json_build_array(s.key, s.version, s.deleted, s.seq, s.updated_by, s.updated_at)), '[]')::text
      INTO v_heads
    FROM shards s
    WHERE s.tenant = p_tenant AND s.space = p_space
      AND s.key = ANY (p_keys || ARRAY(
          SELECT r.ident FROM readset_entries r
          WHERE r.tenant = p_tenant AND r.space = p_space AND r.subject = p_subject
            AND r.session = p_session AND r.kind = 'p'));

    IF v_floor IS NOT NULL AND v_floor < v_seq THEN
        SELECT coalesce(json_agg(
                   json_build_array(s.key, s.version, s.deleted, s.seq, s.updated_by, s.updated_at)), '[]')::text
          INTO v_changed
        FROM shards s
        WHERE s.tenant = p_tenant AND s.space = p_space AND s.seq > v_floor;
    END IF;

    RETURN QUERY SELECT v_seq, v_idem, v_epoch, v_heads, v_changed;
END
$fn$;
"""

COMMIT_APPLY = """
CREATE OR REPLACE FUNCTION agentbus_commit_apply(
    p_tenant text, p_space text, p_subject text, p_session text,
    p_new_seq bigint, p_commit_id text, p_now double precision,
    p_keys text[], p_versions bigint[], p_values text[], p_deleted boolean[], p_writes text,
    p_drop_epoch boolean,
    p_idem text, p_fingerprint text, p_status integer, p_body text
) RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    IF p_new_seq IS NOT NULL THEN
        UPDATE spaces SET seq = p_new_seq WHERE tenant = p_tenant AND space = p_space;
        INSERT INTO shards AS s (tenant, space, key, version, value, deleted, seq, updated_by, updated_at)
        SELECT p_tenant, p_space, w.k, w.v, w.val, w.del, p_new_seq, p_subject, p_now
        FROM unnest(p_keys, p_versions, p_values, p_deleted) AS w(k, v, val, del)
        ON CONFLICT (tenant, space, key) DO UPDATE SET
            version = EXCLUDED.version, value = EXCLUDED.value, deleted = EXCLUDED.deleted,
            seq = EXCLUDED.seq, updated_by = EXCLUDED.updated_by, updated_at = EXCLUDED.updated_at;
        INSERT INTO shard_versions (tenant, space, key, version, value, deleted, seq, updated_by, updated_at)
        SELECT p_tenant, p_space, w.k, w.v, w.val, w.del, p_new_seq, p_subject, p_now
        FROM unnest(p_keys, p_versions, p_values, p_deleted) AS w(k, v, val, del);
        INSERT INTO commits (tenant, space, seq, commit_id, subject, session, at, writes)
        VALUES (p_tenant, p_space, p_new_seq, p_commit_id, p_subject, p_session, p_now, p_writes);
    END IF;
    IF p_drop_epoch THEN
        DELETE FROM readset_entries
        WHERE tenant = p_tenant AND space = p_space AND subject = p_subject AND session = p_session;
        DELETE FROM readset_epochs
        WHERE tenant = p_tenant AND space = p_space AND subject = p_subject AND session = p_session;
    END IF;
    IF p_idem IS NOT NULL THEN
        -- An expired record under the same key is replaced by the new outcome.
        INSERT INTO idempotency AS i (tenant, space, subject, idem_key, fingerprint, status, body, created_at)
        VALUES (p_tenant, p_space, p_subject, p_idem, p_fingerprint, p_status, p_body, p_now)
        ON CONFLICT (tenant, space, subject, idem_key) DO UPDATE SET
            fingerprint = EXCLUDED.fingerprint, status = EXCLUDED.status,
            body = EXCLUDED.body, created_at = EXCLUDED.created_at;
    END IF;
END
$fn$;
"""

FUNCTIONS = ("agentbus_commit_apply", "agentbus_commit_load", "agentbus_read", "agentbus_record")


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    for ddl in (RECORD, READ, COMMIT_LOAD, COMMIT_APPLY):
        op.execute(ddl)


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    for name in FUNCTIONS:
        op.execute(f"DROP FUNCTION IF EXISTS {name} CASCADE")
