"""The webhook delivery worker: Celery tasks on the `webhooks` queue (tasks.py)."""
