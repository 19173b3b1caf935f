"""Queue backends. :func:`create_broker` picks one from a URL's scheme."""

from workers.brokers.base import (
    DEFAULT_URL,
    Broker,
    BrokerURL,
    ClaimedJob,
    JobRecord,
    NewJob,
    Outcome,
    WorkerInfo,
    create_broker,
    mask_url,
    parse_url,
)

__all__ = [
    "DEFAULT_URL",
    "Broker",
    "BrokerURL",
    "ClaimedJob",
    "JobRecord",
    "NewJob",
    "Outcome",
    "WorkerInfo",
    "create_broker",
    "mask_url",
    "parse_url",
]
