"""Shared test configuration: hypothesis profiles.

``make test`` selects the ``ci`` profile (bounded examples, no deadline: CI has 2 shared cores).
``--hypothesis-profile=dev`` runs more examples locally.
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
    print_blob=True,
)
settings.register_profile("dev", max_examples=300, deadline=None, print_blob=True)
settings.load_profile("ci")
