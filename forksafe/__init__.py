"""forksafe: DB-API pools that survive fork()."""
