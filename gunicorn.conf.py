"""gunicorn reads ./gunicorn.conf.py when it starts: worker model, and its own log lines in notifier's format."""

from notifier.logs import gunicorn_logconfig
from notifier.runtime import load_settings, wait_for_database

_settings = load_settings()
logconfig_dict = gunicorn_logconfig(_settings.log_level, _settings.log_format)

# Requests spend most of their time waiting on PostgreSQL and Redis: threads overlap that waiting.
# Measured with `make bench` on 2 cores: gthread with 4 threads accepted 30-40% more than sync.
# gthread, answering gunicorn's own refusals (an over-long header or request line) in the API's JSON
# error envelope instead of HTML.
worker_class = "notifier.httpworker.JsonErrorWorker"
# The API writes its own access line (notifier.api.access); gunicorn's would log tokens and query strings.
logger_class = "notifier.httpworker.ApiLogger"
threads = 4
# gunicorn 27 opens a control socket at one fixed path per user, so a second instance on the same
# host (another replica, a benchmark) would collide with the first; nothing here uses it.
control_socket_disable = True
# Whom to believe about the client is PROXY_HOPS's to say (werkzeug's ProxyFix, in app.py). gunicorn
# itself believes a peer on 127.0.0.1 (or any peer on a unix socket) about the scheme
# (X-Forwarded-Proto and kin) and the SCRIPT_NAME path prefix: a client there, or one whose headers a
# proxy on this host passes on, moved every route under a prefix of its choosing, and one the path did
# not start with was a 500. The API is never mounted under a prefix.
secure_scheme_headers = {}
forwarder_headers = ""


def on_starting(server):
    # Each worker brings the schema up to date as it boots; a database that does not answer yet
    # (started with the API, or restarting) made it exit, and gunicorn with it, with a traceback.
    # The master waits for it first, saying why, and makes the schema current before any worker forks.
    wait_for_database(_settings)
