"""A Celery app with the shared configuration and no tasks, for health probes.

    celery --app services.common.celery_probe inspect ping --destination celery@$HOSTNAME

Pinging through it imports neither torch nor the models (about 50 MB and 2 s instead of
the worker module's 260 MB and 5 s, every healthcheck interval).
"""

from services.common.celery_app import create_celery_app

app = create_celery_app()
