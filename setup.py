from pathlib import Path

from setuptools import find_packages
from setuptools import setup

BUILDBOT = "4.3.0"

setup(
    name="buildbot-ec2-hybrid",
    version="0.1.0",
    description=(
        "Buildbot master plugin: overflow a farm of in-house workers onto a pool of "
        "pre-created, stopped EC2 instances in a private VPC"
    ),
    long_description=Path(__file__).with_name("README.rst").read_text(encoding="utf-8"),
    long_description_content_type="text/x-rst",
    license="GPL-2.0-only",
    python_requires=">=3.10",
    packages=find_packages(include=["buildbot_ec2_hybrid", "buildbot_ec2_hybrid.*"]),
    include_package_data=True,
    package_data={"buildbot_ec2_hybrid.www": ["static/*"]},
    install_requires=[
        f"buildbot=={BUILDBOT}",
        f"buildbot-worker=={BUILDBOT}",
        f"buildbot-www=={BUILDBOT}",
        "boto3>=1.34",
    ],
    extras_require={
        "sandbox": [
            "moto[ec2,server]>=5.0",
            "werkzeug>=3.0",
            "requests>=2.31",
        ],
        # multi-master tests: the WAMP router and PostgreSQL's driver (~400 MB, kept apart)
        "multimaster": [
            "crossbar>=26.10",
            "psycopg2-binary>=2.9",
        ],
        "test": [
            "moto[ec2,server]>=5.0",
            "werkzeug>=3.0",
            "requests>=2.31",
            "pytest>=8",
            "pytest-timeout>=2.3",
            "ruff>=0.6",
            "sphinx>=7",
            "selenium>=4.20",
        ],
    },
    entry_points={
        "buildbot.worker": [
            "EC2PoolWorker = buildbot_ec2_hybrid.worker:EC2PoolWorker",
        ],
        "buildbot.www": [
            "ec2_hybrid = buildbot_ec2_hybrid.www:ep",
        ],
        "buildbot.util": [
            "EC2Pool = buildbot_ec2_hybrid.pool:EC2Pool",
        ],
        "console_scripts": [
            "buildbot-ec2-hybrid = buildbot_ec2_hybrid.cli:main",
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: Software Development :: Build Tools",
    ],
)
