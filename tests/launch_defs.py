"""Test-only code location for tests/test_launch.py: three cheap jobs, loaded by a real gRPC code server."""

import dagster as dg


class GreetingConfig(dg.Config):
    words: int = 3


@dg.asset
def greeting(config: GreetingConfig) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"words": config.words, "text": " ".join(["hello"] * config.words)})


@dg.asset_check(asset=greeting, description="The greeting has at least one word.")
def greeting_has_words(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    event = context.instance.get_latest_materialization_event(greeting.key)
    words = event.asset_materialization.metadata["words"].value
    return dg.AssetCheckResult(passed=words > 0, metadata={"words": words})


@dg.asset
def broken() -> None:
    raise ValueError("boom: this asset always fails")


LETTERS = dg.StaticPartitionsDefinition(["a", "b"])


@dg.asset(partitions_def=LETTERS)
def lettered(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"partition": context.partition_key})


defs = dg.Definitions(
    assets=[greeting, broken, lettered],
    asset_checks=[greeting_has_words],
    jobs=[dg.define_asset_job("greeting_job", selection=[greeting]),
          dg.define_asset_job("broken_job", selection=[broken]),
          dg.define_asset_job("lettered_job", selection=[lettered], partitions_def=LETTERS)],
)
