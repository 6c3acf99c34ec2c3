"""Supervised fine-tuning data (report §4.6, §6.4): caption variants, subdomains, per-(sub)domain SFT shards,
validation losses. Library code: never imports dagster, mlflow or gradio."""
