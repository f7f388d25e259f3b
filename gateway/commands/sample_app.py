"""A small sample upstream with the reference app's five AI routes (quick start and demo).

Run it with ``python -m gateway.commands.sample_app --port 9000``; put creditgate in front
of it with
``creditgate serve --config examples/creditgate.yaml``.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def _who(request: Request) -> dict[str, str | None]:
    return {
        "org": request.headers.get("x-creditgate-org"),
        "user": request.headers.get("x-creditgate-user") or None,
        "feature": request.headers.get("x-creditgate-feature"),
    }


async def generate_leads(request: Request) -> Response:
    return JSONResponse({"leads": [{"name": "Ada", "score": 0.92}], **_who(request)})


async def generate_quests(request: Request) -> Response:
    goal = request.path_params["goal_id"]
    return JSONResponse(
        {"goal": goal, "quests": ["Call 3 prospects", "Send follow-ups"], **_who(request)}
    )


async def analyze_strategy(request: Request) -> Response:
    return JSONResponse({"analysis": "Focus on mid-market.", **_who(request)})


async def forecast_revenue(request: Request) -> Response:
    return JSONResponse({"forecast": [120, 135, 150], **_who(request)})


async def insights(request: Request) -> Response:
    if request.query_params.get("stream"):

        async def events() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"data: insight {i}\n\n".encode()
                await asyncio.sleep(0.05)

        return StreamingResponse(events(), media_type="text/event-stream")
    return JSONResponse(
        {"topic": request.path_params["rest"], "insight": "Churn is down 4%.", **_who(request)}
    )


async def home(request: Request) -> Response:
    return JSONResponse({"app": "creditgate sample upstream", "metered": False})


app = Starlette(
    routes=[
        Route("/", home),
        Route("/api/v1/leads/generate", generate_leads, methods=["POST"]),
        Route("/api/v1/goals/{goal_id}/quests", generate_quests, methods=["POST"]),
        Route("/api/v1/strategy/analyze", analyze_strategy, methods=["POST"]),
        Route("/api/v1/revenue/forecast", forecast_revenue, methods=["POST"]),
        Route("/api/v1/insights/{rest:path}", insights, methods=["GET"]),
    ]
)


def main() -> None:
    """Serve the sample app with uvicorn."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
