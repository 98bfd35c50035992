"""caretaker's client for applications: what an app calls from its own code.

Importable without caretaker's ``exporter`` or ``receiver`` packages on the path.
"""

from .heartbeat import Heartbeat as Heartbeat
