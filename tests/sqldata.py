"""Load the directory contract's data into Stalwart's sample SQL schema (tests/data/sql/stalwart.sql)."""

from __future__ import annotations

from pathlib import Path

from mailroster.backends.store import Store

from contract import DOMAINS, PRINCIPALS

SCHEMA = Path(__file__).parent / "data" / "sql" / "stalwart.sql"


def schema_statements() -> list[str]:
    text = "\n".join(line for line in SCHEMA.read_text().splitlines() if not line.startswith("--"))
    return [s.strip() for s in text.split(";") if s.strip()]


async def load_contract_data(store: Store) -> None:
    """Create the schema and insert :data:`contract.PRINCIPALS` as Stalwart's sample schema would hold them."""
    await store.executescript(schema_statements())
    async with store.transaction() as tx:
        for p in PRINCIPALS:
            secrets = [p["secret"]] if isinstance(p.get("secret"), str) else list(p.get("secret", []))
            await tx.execute(
                "INSERT INTO accounts (name, secret, description, type, quota, active) VALUES ($1, $2, $3, $4, $5, $6)",
                p["name"], secrets[0] if secrets else None, p.get("description", ""),
                p.get("class", "individual"), p.get("quota", 0), p.get("enabled", True),
            )  # fmt: skip
            for secret in secrets[1:]:
                await tx.execute("INSERT INTO app_passwords (name, secret) VALUES ($1, $2)", p["name"], secret)
            for group in p.get("member-of", []):
                await tx.execute("INSERT INTO group_members (name, member_of) VALUES ($1, $2)", p["name"], group)
            for i, address in enumerate(p.get("email", [])):
                kind = "primary" if i == 0 else "alias"
                await tx.execute(
                    "INSERT INTO emails (name, address, type) VALUES ($1, $2, $3)", p["name"], address, kind
                )
            for address in p.get("email-list", []):
                await tx.execute("INSERT INTO emails (name, address, type) VALUES ($1, $2, 'list')", p["name"], address)
            for member in p.get("members", []):
                await tx.execute("INSERT INTO list_members (name, address) VALUES ($1, $2)", p["name"], member)
        for domain in DOMAINS:
            await tx.execute("INSERT INTO domains (name) VALUES ($1)", domain)
