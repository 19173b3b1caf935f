from types import ModuleType
from typing import Any

def install(
    pool: type,
    proxy: type,
    dedicated: type,
    connection: type,
    cursor: type,
    page: object,
    armed: object,
    fork: ModuleType,
    empty: type[Exception],
) -> None: ...

class Quiet:
    def __init__(self, sock: object, fd: int) -> None: ...
    def __call__(self, con: Any) -> bool: ...
