-- 0001: initial schema, the same rows as the SQLite store's schema version 1.
--
-- Migrations that follow should only add (tables, columns with defaults, indexes), so
-- that supernodes of the previous version keep running during a rolling upgrade; one that
-- renames or drops must say at its top that every supernode has to stop first.
--
-- Usernames are canonical (lower-case ASCII) and compared in the "C" collation: byte
-- order, the same as SQLite's BINARY, so sorting matches the embedded store and the
-- primary key's b-tree serves prefix ranges (`username >= $1 AND username < $2`).
-- Caller-chosen u64 values (msg_id, sent_at, created_at) are stored bit-for-bit in bigint.
-- Message texts and request notes are UTF-8 in bytea: PostgreSQL text cannot hold NUL,
-- which a Rust string (and so a sender) may contain.

CREATE TABLE accounts (
    username      text   COLLATE "C" NOT NULL PRIMARY KEY,
    password_hash text   NOT NULL,
    created_at    bigint NOT NULL
);

CREATE TABLE devices (
    noise_key bytea   NOT NULL PRIMARY KEY CHECK (octet_length(noise_key) = 32),
    username  text    COLLATE "C" NOT NULL REFERENCES accounts (username),
    device_id bytea   NOT NULL CHECK (octet_length(device_id) = 16),
    sign_key  bytea   NOT NULL CHECK (octet_length(sign_key) = 32),
    revoked   boolean NOT NULL DEFAULT false
);
CREATE INDEX devices_by_username ON devices (username);

-- Certificate serials: a sequence never hands out a value twice, whichever supernode
-- asks, and jumps forward (never back) after a crash.
CREATE SEQUENCE cert_serial AS bigint START WITH 1 MINVALUE 1;

CREATE TABLE contacts (
    owner text     COLLATE "C" NOT NULL,
    peer  text     COLLATE "C" NOT NULL,
    state smallint NOT NULL CHECK (state BETWEEN 1 AND 4),
    note  bytea    NOT NULL,
    PRIMARY KEY (owner, peer)
);

-- One row per recipient that ever had mail: queue_message locks it (SELECT ... FOR
-- UPDATE) so that the quota check and the insert are atomic across supernodes.
CREATE TABLE mailboxes (
    recipient text COLLATE "C" NOT NULL PRIMARY KEY
);

CREATE TABLE messages (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sender    text   COLLATE "C" NOT NULL,
    recipient text   COLLATE "C" NOT NULL,
    msg_id    bigint NOT NULL,
    sent_at   bigint NOT NULL,
    text      bytea  NOT NULL,
    UNIQUE (sender, msg_id)
);
CREATE INDEX messages_by_recipient ON messages (recipient, id);
