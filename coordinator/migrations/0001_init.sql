-- berth's shared store: the same records the embedded store keeps (leases,
-- hosts, other state), plus the one row that says who leads.
--
-- Applied by berth-coordinator at start (coordinator/src/pg/migrate.rs),
-- each file once, in order, in one transaction under an advisory lock, so
-- coordinators starting together do not race.

-- One lease per row; the record is the same JSON document the embedded
-- store keeps (coordinator/src/store.rs, LeaseRecord).
CREATE TABLE berth_leases (
    id     text PRIMARY KEY,
    record jsonb NOT NULL
);

-- What the pool remembers of a host beyond its connection (HostRecord:
-- the key its id is bound to, when it was burned).
CREATE TABLE berth_hosts (
    id     text PRIMARY KEY,
    record jsonb NOT NULL
);

-- Anything else that must outlive a coordinator: the pool CA (its key
-- sealed, see coordinator/src/pg/seal.rs), the tenants, the join token hash.
CREATE TABLE berth_meta (
    key   text PRIMARY KEY,
    value bytea NOT NULL
);

-- Who leads. One row. A coordinator leads while `expires_at` (the
-- database's clock) is ahead; it renews well before, and takes the row over
-- only once it has expired, raising `term`. Every write to the tables above
-- checks, in its own transaction and under a share lock of this row, that
-- the writer's term is still the current one and unexpired: a deposed
-- leader's writes fail (fencing).
CREATE TABLE berth_leader (
    id         int PRIMARY KEY CHECK (id = 1),
    term       bigint NOT NULL,
    holder     text NOT NULL,
    addr       text NOT NULL,
    expires_at timestamptz NOT NULL
);
INSERT INTO berth_leader (id, term, holder, addr, expires_at)
VALUES (1, 0, '', '', '-infinity');
