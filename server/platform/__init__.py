"""What differs between devices, behind one object chosen when an engine starts (base.py).

Importing the package registers every platform. That also imports cpu_threads, which reads torch's default
thread count at import: it must happen before a process sets torch's threads (as `quiver serve` and the bench
do), so the engine can claim the default for its own thread.
"""

from quiver.server.platform import base, cpu, cuda  # noqa: F401  (cpu and cuda register themselves in base)
