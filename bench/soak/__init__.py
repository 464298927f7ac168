"""The fault-injection soak: three real nodes on loopback under mixed load while a chaos script
kills and restarts a node, makes upstreams fail and rate-limit, and freezes nodes (gossip drops).

`python -m bench.soak [--minutes 10] [--quick]` runs it and writes its table (docs/soak.md with
`--report`). Modules, one concept each:

- `cluster`   the three fake upstreams and three `meshnode run` processes, and C's restarts;
- `load`      the clients: chat, streamed chat and embeddings, one log line per start and per end;
- `chaos`     the fault schedule;
- `memory`    RSS samples from /proc;
- `invariants` what must hold at the end (pure functions over the logs and samples);
- `report`    the markdown table;
- `run`       puts them together, bounded in time and in request count.

Everything listens on 127.0.0.1 (mDNS off); every process is stopped on exit.
"""
