"""workers: a prefork supervisor and a durable job queue built on forksafe pools."""
