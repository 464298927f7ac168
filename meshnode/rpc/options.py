"""gRPC channel and server settings every node uses, so peers agree on them.

Keepalive: clients ping an idle connection every 20 s and servers allow pings every 10 s, so a
healthy peer is never told "too_many_pings" and a dead one is found without traffic. Reconnect
backoff is short because mesh peers are on a LAN and membership decides liveness, not gRPC.
Message sizes are bounded in both directions; `meshnode.rpc.guard` bounds each method tighter.
"""

from __future__ import annotations

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # an OpenAI body or answer; gossip stays far below
# Gossip carries at most 256 records (each state bounded in rpc/convert.py: blobs 16 x 64 KiB),
# and a digest of at most 4,096 members; anything bigger is refused before it is parsed.
MAX_GOSSIP_BYTES = 8 * 1024 * 1024
MAX_HEALTH_BYTES = 64 * 1024

KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 5_000
MIN_PING_INTERVAL_MS = 10_000

CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.enable_retries", 0),  # the router and the membership driver decide retries
    ("grpc.use_local_subchannel_pool", 1),  # one connection per peer channel, not shared
]

SERVER_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.so_reuseport", 0),  # port 0 must give this process its own port
]
