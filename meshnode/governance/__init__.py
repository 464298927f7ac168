"""Governance: who may call (API keys, auth), how fast (rate limits) and how much (budgets).

    keys.py       KeyStore: key records in SQLite in data_dir plus keys from the config; only
                  SHA-256 hashes are stored; versioned records for gossip
    auth.py       Bearer parsing, route classes (public / any key / admin), model allow-lists
    ratelimit.py  per-key token buckets (requests/min, tokens/min) and OpenAI's x-ratelimit-*
    periods.py    UTC budget periods (day, month) and their rollovers
    counters.py   per-node, per-period grow-only spend counters (a G-counter CRDT)
    budget.py     the spend ledger: reservations, settlement, limits, crash recovery
    gate.py       the router's hook: price a call's worst case, reserve, settle or release
    http.py       the aiohttp side: middleware, response headers, /admin/keys
    service.py    `Governance`: builds the above from the config, owns their lifetimes
    cli.py        `meshnode keys create|list|revoke`

Nothing here logs, returns or labels a metric with a key, its hash or an Authorization header.
"""
