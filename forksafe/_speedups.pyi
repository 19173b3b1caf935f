from types import ModuleType

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
