"""``python -m dataplane.worker``: one worker process (see ``dataplane.worker.worker``)."""

from dataplane.worker.worker import main

main()
