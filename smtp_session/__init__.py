"""smtp-session-worker: open outbound SMTP sessions and say exactly why they fail.

The distribution's one import name. Inside it: `smtp_session.tasks` (the session core and
the Celery tasks over it), `smtp_session.worker` (the Celery app, settings, command line,
client) and `smtp_session.monitoring` (logs and metrics). In the repository these are the
folders tasks/, worker/ and monitoring/, linked here.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("smtp-session-worker")
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"
