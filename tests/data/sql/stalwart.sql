-- Stalwart's sample SQL schema (docs 0.15 auth/backend/sql), portable to SQLite, PostgreSQL and MariaDB,
-- plus app_passwords, list_members and domains (see conf.d/examples/sql-stalwart.toml).
CREATE TABLE accounts (name VARCHAR(255) PRIMARY KEY, secret VARCHAR(512), description VARCHAR(255), type VARCHAR(32) NOT NULL, quota BIGINT DEFAULT 0, active BOOLEAN DEFAULT true);
CREATE TABLE group_members (name VARCHAR(255) NOT NULL, member_of VARCHAR(255) NOT NULL, PRIMARY KEY (name, member_of));
CREATE TABLE emails (name VARCHAR(255) NOT NULL, address VARCHAR(255) NOT NULL, type VARCHAR(32), PRIMARY KEY (name, address));
CREATE INDEX emails_address ON emails (address);
CREATE TABLE app_passwords (name VARCHAR(255) NOT NULL, secret VARCHAR(512) NOT NULL);
CREATE TABLE list_members (name VARCHAR(255) NOT NULL, address VARCHAR(255) NOT NULL);
CREATE TABLE domains (name VARCHAR(255) PRIMARY KEY);
