"""gunicorn reads ./gunicorn.conf.py when it starts: its own log lines in notifier's format, too."""

from notifier.logs import gunicorn_logconfig
from notifier.runtime import load_settings

_settings = load_settings()
logconfig_dict = gunicorn_logconfig(_settings.log_level, _settings.log_format)
