"""multiprocessing: nothing to install. This module only documents why.

**fork** (the default start method on Linux before Python 3.14): the child is made by
:func:`os.fork`, which runs forksafe's ``os.register_at_fork`` hook. Every pool in the
child discards, without a byte to the server, the connections it inherited, and opens
its own on first use; the parent's sessions are untouched, including when the child
exits with ``sys.exit()`` or is garbage collected. A pool built at module level and
used by the parent before ``Pool()`` or ``Process.start()`` is safe to use in the
children as it is. (Django's connections need ``import forksafe.integrations.django``,
whose fork hook detaches them the same way.)

**spawn** and **forkserver**: the child is a fresh interpreter (forkserver forks it from a
server process that imported only what ``set_forkserver_preload()`` named). Nothing is
inherited, so there is nothing to discard: the child imports your module again and its
module-level pools are new and empty. What does not work is handing a pool or a
connection to the child as an argument (a ``Process`` target's arguments, a task's
arguments or result): they hold locks and sockets and cannot be pickled. Pass the
connection parameters and build the pool in the child (at module level or in a ``Pool``
``initializer``).
"""

from __future__ import annotations

__all__: list[str] = []
