"""The domain, pure: job statuses and their transitions, the typed job record, what Potpie's answers mean, the
events and their payloads, request rules, domain errors. No Flask, Celery, Redis or HTTP here."""
