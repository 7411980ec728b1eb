"""PostgreSQL server functions for the optimistic commit path

Revision ID: 0006
Revises: 0005

With 0005 a commit held its space row lock across three network round trips (load,
validate in Python, apply, COMMIT), which serialised every commit of a space behind the
slowest client round trip. Here a commit is validate-then-compare-and-apply:

* ``agentbus_commit_peek`` fetches what ``agentbus_commit_load`` fetches (space seq,
  idempotency record, epoch, heads, ``changed``) but takes no lock. It is STABLE, so all its
  statements read one snapshot.
* Python decides with ``agentbus.core.validation``, exactly as before.
* ``agentbus_commit_try`` takes the space row lock, checks that nothing the decision
  depended on changed since the peek, and if so applies it through ``agentbus_commit_apply``
  with seq = locked seq + 1; otherwise it returns -1 and Python peeks again. The lock is
  held only while this one statement runs, never across a network round trip.

Why the decision is still the one the locked path would make: every writer of a space's
shards holds the space row lock, and each statement inside a VOLATILE PL/pgSQL function
takes a fresh snapshot (READ COMMITTED), so after the lock the function sees every earlier
commit. The decision is a function of: the versions of the keys it looked at (compared one
by one; a version is never reused, a tombstone has one too), the session's epoch (compared
by the header row's ``xmin``: adding an entry, overflowing, clearing and re-creating all
write a new header row version, which a generation counter alone would miss for the last
two), for range reads the space seq (``changed`` is every head above the oldest range's seq,
so an unchanged seq means an unchanged ``changed``), and the absence of a live idempotency
record under the request's key. If all of these are as seen, the state validated against
is the state at the commit point.

A failed check may leave one trace: the space row, created by the lock statement on a
space's first commit. Every commit outcome creates it anyway, so the retry does no more.
SQLite has no server functions; there this migration does nothing.
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

COMMIT_PEEK = """
CREATE OR REPLACE FUNCTION agentbus_commit_peek(
    p_tenant text, p_space text, p_subject text, p_session text,
    p_keys text[], p_idem text
) RETURNS TABLE (
    o_seq bigint, o_space boolean, o_idem text, o_epoch text, o_epoch_tag text, o_heads text, o_changed text
) LANGUAGE plpgsql STABLE AS $fn$
DECLARE
    v_seq bigint;
    v_space boolean;
    v_idem text;
    v_epoch text;
    v_tag text;
    v_heads text;
    v_changed text;
    v_floor bigint;
    v_started double precision;
    v_overflow boolean;
    v_gen bigint;
BEGIN
    -- No lock anywhere: agentbus_commit_try re-checks what the decision depends on.
    SELECT s.seq INTO v_seq FROM spaces s WHERE s.tenant = p_tenant AND s.space = p_space;
    v_space := FOUND;
    v_seq := coalesce(v_seq, 0);

    IF p_idem IS NOT NULL THEN
        SELECT json_build_array(i.fingerprint, i.status, i.body, i.created_at)::text INTO v_idem
        FROM idempotency i
        WHERE i.tenant = p_tenant AND i.space = p_space AND i.subject = p_subject AND i.idem_key = p_idem;
    END IF;

    SELECT e.started_at, e.overflow, e.gen, e.xmin::text INTO v_started, v_overflow, v_gen, v_tag
    FROM readset_epochs e
    WHERE e.tenant = p_tenant AND e.space = p_space AND e.subject = p_subject AND e.session = p_session;
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

    RETURN QUERY SELECT v_seq, v_space, v_idem, v_epoch, v_tag, v_heads, v_changed;
END
$fn$;
"""

COMMIT_TRY = """
CREATE OR REPLACE FUNCTION agentbus_commit_try(
    p_tenant text, p_space text, p_subject text, p_session text, p_now double precision,
    p_seen_keys text[], p_seen_versions bigint[], p_epoch_tag text, p_seen_seq bigint,
    p_idem_cutoff double precision,
    p_commit_id text, p_keys text[], p_versions bigint[], p_values text[], p_deleted boolean[], p_writes text,
    p_idem text, p_fingerprint text, p_status integer, p_body text, p_body_tail text
) RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
    v_seq bigint;
    v_tag text;
    v_new_seq bigint;
BEGIN
    -- The space row lock orders every commit of the space; every check below runs after it,
    -- each statement on a fresh snapshot, so it sees every commit that held the lock before.
    INSERT INTO spaces AS s (tenant, space, seq, created_at) VALUES (p_tenant, p_space, 0, p_now)
    ON CONFLICT (tenant, space) DO UPDATE SET seq = s.seq
    RETURNING s.seq INTO v_seq;

    -- Range reads: "changed" was every head above the oldest range's seq; same seq, same set.
    IF p_seen_seq IS NOT NULL AND v_seq <> p_seen_seq THEN
        RETURN -1;
    END IF;
    -- Every head the decision looked at (0 = absent) is still at the version seen.
    IF EXISTS (
        SELECT 1 FROM unnest(p_seen_keys, p_seen_versions) AS o(k, v)
        LEFT JOIN shards s ON s.tenant = p_tenant AND s.space = p_space AND s.key = o.k
        WHERE coalesce(s.version, 0) <> o.v
    ) THEN
        RETURN -1;
    END IF;
    -- A concurrent twin of this request may have stored its outcome: replay it instead.
    IF p_idem IS NOT NULL AND EXISTS (
        SELECT 1 FROM idempotency i
        WHERE i.tenant = p_tenant AND i.space = p_space AND i.subject = p_subject AND i.idem_key = p_idem
          AND i.created_at >= p_idem_cutoff
    ) THEN
        RETURN -1;
    END IF;
    -- The epoch is the one seen (same header row version), or there is none as seen. Locked
    -- so the session's own reads wait for this commit, as on the locked path.
    SELECT e.xmin::text INTO v_tag
    FROM readset_epochs e
    WHERE e.tenant = p_tenant AND e.space = p_space AND e.subject = p_subject AND e.session = p_session
    FOR UPDATE;
    IF v_tag IS DISTINCT FROM p_epoch_tag THEN
        RETURN -1;
    END IF;

    IF p_commit_id IS NOT NULL THEN
        v_new_seq := v_seq + 1;
    END IF;
    -- Every commit ends the epoch it saw. A 200's stored body gets the seq assigned here.
    PERFORM agentbus_commit_apply(
        p_tenant, p_space, p_subject, p_session, v_new_seq, p_commit_id, p_now,
        p_keys, p_versions, p_values, p_deleted, p_writes, v_tag IS NOT NULL,
        p_idem, p_fingerprint, p_status,
        CASE WHEN p_body_tail IS NULL THEN p_body ELSE p_body || v_new_seq::text || p_body_tail END);
    RETURN coalesce(v_new_seq, 0);
END
$fn$;
"""

FUNCTIONS = ("agentbus_commit_try", "agentbus_commit_peek")


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    for ddl in (COMMIT_PEEK, COMMIT_TRY):
        op.execute(ddl)


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    for name in FUNCTIONS:
        op.execute(f"DROP FUNCTION IF EXISTS {name} CASCADE")
