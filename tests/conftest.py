"""Shared fixtures: real servers started by the suite itself on free 127.0.0.1 ports.

Fixture modules live in tests/support/ (one per kind of server); they are imported here so every test
module sees them.
"""

from tests.support.aws import *  # noqa: F403
from tests.support.callback import *  # noqa: F403
from tests.support.faulty_proxy import *  # noqa: F403
from tests.support.servers import *  # noqa: F403
from tests.support.trace_agent import *  # noqa: F403
