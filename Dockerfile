# notifier: Flask API (gunicorn), RQ worker and rq-scheduler share this image;
# docker-compose.yml picks the process with `command:`.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Unprivileged user the processes run as.
RUN groupadd --system notifier \
    && useradd --system --gid notifier --home-dir /app --no-create-home --shell /usr/sbin/nologin notifier

WORKDIR /app

# Dependencies first, so code changes don't invalidate this layer.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

# Application code (root-owned, read-only for the runtime user).
COPY app.py worker.py scheduler.py gunicorn.conf.py ./
COPY notifier/ ./notifier/
COPY templates/ ./templates/

# Writable scratch directory (the sqlite default lives in var/).
RUN mkdir -p /app/var && chown notifier:notifier /app/var

USER notifier

EXPOSE 5000

HEALTHCHECK --interval=10s --timeout=3s --retries=3 CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:5000/api/health', timeout=2).status==200 else 1)"

CMD ["gunicorn", "--bind", "0.0.0.0:5000", "--workers", "2", "app:create_app()"]
