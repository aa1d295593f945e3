"""`sdft serve`: an OpenAI-compatible endpoint over a learner, learning from demonstrations sent to it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_command(
        workdir: Path = typer.Argument(..., help="The learner's directory (`sdft learn init`)."),
        host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
        port: int = typer.Option(8000, help="Port to listen on."),
        api_key: Optional[str] = typer.Option(
            None, envvar="SELFDISTILL_API_KEY", help="Key the write endpoints require (Authorization: Bearer KEY)."
        ),
        round_every: Optional[int] = typer.Option(
            None, help="Start a round once this many demonstrations are pending."
        ),
        round_interval: Optional[float] = typer.Option(
            None, help="Start a round every this many seconds while demonstrations are pending."
        ),
        max_new_tokens: int = typer.Option(256, help="The most new tokens a request may ask for."),
        max_request_bytes: int = typer.Option(1_000_000, help="Largest request body accepted."),
        max_records: int = typer.Option(1000, help="Most demonstrations in one request."),
        engine: str = typer.Option(
            "decode",
            help="What answers: decode (our decode loop, in this process), vllm (an in-process vLLM engine, "
            "batching requests), or the URL of a vLLM server that loads each version as a LoRA adapter.",
        ),
        precision: str = typer.Option("auto", help="The in-process vLLM engine's precision: auto, fp32 or bf16."),
        engine_api_key: Optional[str] = typer.Option(
            None, envvar="SELFDISTILL_ENGINE_API_KEY", help="The external vLLM server's API key, if it has one."
        ),
        round_gpus: Optional[str] = typer.Option(
            None, help="GPUs rounds train on (CUDA_VISIBLE_DEVICES, e.g. 1,2; several: torchrun, one process each)."
        ),
    ) -> None:
        """Serve the learner's current version (chat, completions, streaming) and learn from demonstrations:
        rounds run in their own process, and a promoted version is served from the next request on."""
        import uvicorn

        from selfdistill.serve import ServeSettings, create_app

        settings = ServeSettings(
            api_key=api_key,
            max_request_bytes=max_request_bytes,
            max_records=max_records,
            max_new_tokens=max_new_tokens,
            round_every=round_every,
            round_interval=round_interval,
            engine=engine,
            engine_precision=precision,
            engine_api_key=engine_api_key,
            round_devices=round_gpus,
        )
        application = create_app(workdir, settings)
        served = application.state.host
        typer.echo(
            f"serving {workdir} (version {served.served.version}, {served.engine.name}) on http://{host}:{port}/"
        )
        uvicorn.run(application, host=host, port=port, log_level="warning")
