"""PostgreSQL: a commit whose whole read set the bus process already knows is one round trip

Revision ID: 0007
Revises: 0006

Before, every commit peeked (round trip 1) and then tried (round trip 2). But a commit that
names the version of everything it writes (``expected_version``), or whose session's epoch
this process holds an exact copy of (:mod:`agentbus.store.shadows`), can be decided in
Python *before* looking: assume every guarded head is at the guarded version, and let core
validation plan the commit on that assumption. ``agentbus_commit_blind`` then checks the
assumption and applies in one statement:

* an unlocked pre-check: the heads are at the assumed versions and the epoch has the
  assumed tag (no epoch, or the copy's). It writes nothing, so a stale assumption (the usual
  409 under contention) costs no WAL flush;
* ``agentbus_commit_try`` (migration 0006): the space row lock, the same checks again under
  it, and the apply. Its checks make the decision the one the locked path would make;
* if either check fails, the function returns ``agentbus_commit_peek``'s row instead, and
  Python continues exactly as after a peek: a 409 without anything to store is still one
  round trip, and nothing is decided on the assumption.

For the copy, ``agentbus_record`` (a delivered read) now locks the epoch header with
``SELECT ... FOR UPDATE`` and reports what it did to the epoch and the header's ``xmin``
before and after, read under that lock; ``agentbus_read`` passes that on. A read that adds
nothing no longer writes a new header row version (the lock alone orders it against the
session's commit), so its tags before and after are equal. Every change of an epoch's
content still writes one (adding an entry, overflowing, ending and re-creating it), which is
what the tags of migration 0006 rely on.

SQLite has no server functions; there this migration does nothing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

EPOCH_PK = "e.tenant = p_tenant AND e.space = p_space AND e.subject = p_subject AND e.session = p_session"

RECORD = f"""
CREATE FUNCTION agentbus_record(
    p_tenant text, p_space text, p_subject text, p_session text,
    p_kind text, p_ident text, p_version bigint,
    p_prefix text, p_start_after text, p_end_at text,
    p_now double precision, p_max integer,
    OUT o_did text, OUT o_tag_before text, OUT o_tag_after text, OUT o_started double precision
) LANGUAGE plpgsql AS $fn$
DECLARE
    h_n integer;
    h_overflow boolean;
    added integer;
BEGIN
    o_did := 'n';
    -- Lock the epoch header, noting its tag under the lock (this orders the read against the
    -- session's own commit), or create it; a NULL tag before means "created by this read".
    LOOP
        SELECT e.xmin::text, e.n, e.overflow, e.started_at INTO o_tag_before, h_n, h_overflow, o_started
        FROM readset_epochs e WHERE {EPOCH_PK}
        FOR UPDATE;
        EXIT WHEN FOUND;
        INSERT INTO readset_epochs (tenant, space, subject, session, started_at, n, overflow, gen)
        VALUES (p_tenant, p_space, p_subject, p_session, p_now, 0, false, 0)
        ON CONFLICT DO NOTHING
        RETURNING n, overflow, started_at INTO h_n, h_overflow, o_started;
        EXIT WHEN FOUND;
        -- Another read created it between the two statements: lock that one.
    END LOOP;
    IF h_overflow THEN
        NULL;
    ELSIF h_n >= p_max THEN
        -- Full: a key already recorded needs no entry; a new one cannot be recorded.
        PERFORM 1 FROM readset_entries r
        WHERE r.tenant = p_tenant AND r.space = p_space AND r.subject = p_subject
          AND r.session = p_session AND r.kind = p_kind AND r.ident = p_ident;
        IF NOT FOUND THEN
            UPDATE readset_epochs e SET overflow = true WHERE {EPOCH_PK};
            o_did := 'o';
        END IF;
    ELSE
        INSERT INTO readset_entries (tenant, space, subject, session, kind, ident, prefix, start_after, end_at, version)
        VALUES (p_tenant, p_space, p_subject, p_session, p_kind, p_ident, p_prefix, p_start_after, p_end_at, p_version)
        ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS added = ROW_COUNT;
        IF added = 1 THEN
            UPDATE readset_epochs e SET n = e.n + 1, gen = e.gen + 1 WHERE {EPOCH_PK};
            o_did := 'a';
        END IF;
    END IF;
    SELECT e.xmin::text INTO o_tag_after FROM readset_epochs e WHERE {EPOCH_PK};
END
$fn$;
"""

READ = """
CREATE FUNCTION agentbus_read(
    p_tenant text, p_space text, p_subject text, p_session text, p_key text,
    p_now double precision, p_max integer
) RETURNS TABLE (
    o_found boolean, o_version bigint, o_value text, o_deleted boolean,
    o_seq bigint, o_updated_by text, o_updated_at double precision,
    o_did text, o_tag_before text, o_tag_after text, o_started double precision
) LANGUAGE plpgsql AS $fn$
DECLARE
    h record;
    r record;
BEGIN
    SELECT s.version, s.value, s.deleted, s.seq, s.updated_by, s.updated_at INTO h
    FROM shards s WHERE s.tenant = p_tenant AND s.space = p_space AND s.key = p_key;
    IF FOUND THEN
        SELECT * INTO r FROM agentbus_record(p_tenant, p_space, p_subject, p_session, 'p', p_key, h.version,
                                             NULL, NULL, NULL, p_now, p_max);
        RETURN QUERY SELECT true, h.version, h.value, h.deleted, h.seq, h.updated_by, h.updated_at,
                            r.o_did, r.o_tag_before, r.o_tag_after, r.o_started;
    ELSE
        SELECT * INTO r FROM agentbus_record(p_tenant, p_space, p_subject, p_session, 'p', p_key, 0::bigint,
                                             NULL, NULL, NULL, p_now, p_max);
        RETURN QUERY SELECT false, 0::bigint, NULL::text, false, 0::bigint, NULL::text, 0::double precision,
                            r.o_did, r.o_tag_before, r.o_tag_after, r.o_started;
    END IF;
END
$fn$;
"""

COMMIT_BLIND = f"""
CREATE OR REPLACE FUNCTION agentbus_commit_blind(
    p_tenant text, p_space text, p_subject text, p_session text, p_now double precision,
    p_seen_keys text[], p_seen_versions bigint[], p_epoch_tag text, p_seen_seq bigint,
    p_idem_cutoff double precision,
    p_commit_id text, p_keys text[], p_versions bigint[], p_values text[], p_deleted boolean[], p_writes text,
    p_idem text, p_fingerprint text, p_status integer, p_body text, p_body_tail text,
    p_peek_keys text[]
) RETURNS TABLE (
    o_new_seq bigint,
    o_seq bigint, o_space boolean, o_idem text, o_epoch text, o_epoch_tag text, o_heads text, o_changed text
) LANGUAGE plpgsql AS $fn$
DECLARE
    v_new bigint;
BEGIN
    -- Unlocked, writes nothing: is the assumption plausible? The try re-checks it under the lock.
    IF NOT EXISTS (
        SELECT 1 FROM unnest(p_seen_keys, p_seen_versions) AS a(k, v)
        LEFT JOIN shards s ON s.tenant = p_tenant AND s.space = p_space AND s.key = a.k
        WHERE coalesce(s.version, 0) <> a.v
    ) AND (SELECT e.xmin::text FROM readset_epochs e WHERE {EPOCH_PK}) IS NOT DISTINCT FROM p_epoch_tag THEN
        v_new := agentbus_commit_try(
            p_tenant, p_space, p_subject, p_session, p_now,
            p_seen_keys, p_seen_versions, p_epoch_tag, p_seen_seq, p_idem_cutoff,
            p_commit_id, p_keys, p_versions, p_values, p_deleted, p_writes,
            p_idem, p_fingerprint, p_status, p_body, p_body_tail);
        IF v_new <> -1 THEN
            RETURN QUERY SELECT v_new, NULL::bigint, NULL::boolean, NULL::text, NULL::text, NULL::text,
                                NULL::text, NULL::text;
            RETURN;
        END IF;
    END IF;
    -- The assumption did not hold: what a peek would have returned, for Python to decide on.
    RETURN QUERY SELECT NULL::bigint, p.*
    FROM agentbus_commit_peek(p_tenant, p_space, p_subject, p_session, p_peek_keys, p_idem) AS p;
END
$fn$;
"""


def _revision_0005() -> ModuleType:
    """The functions this migration replaces, for downgrade (migration files are not a package)."""
    path = Path(__file__).with_name("0005_pg_hot_path_functions.py")
    spec = importlib.util.spec_from_file_location("agentbus_migration_0005", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    # New result columns: CREATE OR REPLACE cannot change a function's result type.
    op.execute("DROP FUNCTION IF EXISTS agentbus_read(text, text, text, text, text, double precision, integer)")
    op.execute(
        "DROP FUNCTION IF EXISTS agentbus_record(text, text, text, text, text, text, bigint, text, text, text,"
        " double precision, integer)"
    )
    for ddl in (RECORD, READ, COMMIT_BLIND):
        op.execute(ddl)


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute("DROP FUNCTION IF EXISTS agentbus_commit_blind CASCADE")
    op.execute("DROP FUNCTION IF EXISTS agentbus_read CASCADE")
    op.execute("DROP FUNCTION IF EXISTS agentbus_record CASCADE")
    old = _revision_0005()
    for ddl in (old.RECORD, old.READ):
        op.execute(ddl)
