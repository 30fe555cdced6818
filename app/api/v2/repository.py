"""The Open Inference Protocol's model-repository extension, as Triton's explicit model control
speaks it (and tritonclient's ``get_model_repository_index``, ``load_model`` and ``unload_model``
call it): the repository's index, and loading, reloading and unloading a model while the server
runs. Thin: ``Serving.control`` (app.serving) does the work, for gRPC as well; these routes map
its refusals to HTTP statuses."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from app.api.deps import ServingDep, require_api_key
from app.api.errors import (
    BadRequest,
    ModelControlDenied,
    ModelControlOff,
    ModelLoadError,
    ModelNotFound,
)
from app.api.inference import limited, read_all
from app.api.v2.schemas import ProtocolError
from app.state import (
    ModelControl,
    ModelControlDisabled,
    ModelControlRefused,
    ModelLoadFailed,
    ModelState,
    RepositoryEntry,
    UnknownModel,
)

# The bodies are a few parameters; anything much larger is not a request for this extension.
MAX_BODY_BYTES = 64 * 1024

router = APIRouter(
    prefix="/v2/repository",
    tags=["v2 model repository"],
    dependencies=[Depends(require_api_key)],
    responses={code: {"model": ProtocolError} for code in (400, 401, 403, 404, 413, 501, 503)},
)


class RepositoryIndexEntry(BaseModel):
    """One model of the repository."""

    name: str = Field(examples=["digits"])
    version: str = Field(examples=["1"])
    state: ModelState = Field(examples=["READY"])
    reason: str = Field(
        description='Why it is not READY ("unloaded", "not loaded", a failed load\'s cause); '
        '"reloading" while a READY model reloads.',
        examples=[""],
    )


async def get_control(serving: ServingDep) -> ModelControl:
    return serving.control


ControlDep = Annotated[ModelControl, Depends(get_control)]
Name = Annotated[str, Path(description="Model name: its folder in the model repository.")]


@contextmanager
def control_errors() -> Iterator[None]:
    """The model control's refusals as HTTP errors (the gRPC service maps the same ones)."""
    try:
        yield
    except ModelControlDisabled as exc:
        raise ModelControlOff(str(exc)) from None
    except UnknownModel as exc:
        raise ModelNotFound(str(exc)) from None
    except ModelLoadFailed as exc:
        raise ModelLoadError(str(exc)) from None
    except ModelControlRefused as exc:
        raise ModelControlDenied(str(exc)) from None


def check_load_parameters(parameters: Iterable[str]) -> None:
    """Refuse a load that sends the model itself (Triton's ``config`` and ``file:``
    parameters): evalserve loads from its repository only."""
    sent = [key for key in parameters if key == "config" or key.startswith("file:")]
    if sent:
        raise BadRequest(
            f"evalserve loads models from its repository only: {', '.join(sent)} (a model "
            "sent with the request) is not supported"
        )


async def _parameters(request: Request) -> dict[str, Any]:
    """The JSON object a request may carry (tritonclient sends one, or an empty body)."""
    body = await read_all(limited(request.stream(), MAX_BODY_BYTES))
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest("the request body must be a JSON object")
    return value


def _body(properties: dict[str, Any], example: dict[str, Any]) -> dict[str, Any]:
    """An optional JSON body, for the schema: the routes read it themselves, so that an empty
    body (tritonclient's index) or one without a JSON content type (curl -d) is accepted."""
    schema = {"type": "object", "properties": properties}
    return {
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": schema, "example": example}},
        }
    }


_PARAMETERS = {"parameters": {"type": "object", "additionalProperties": True}}


async def _parameters_of(request: Request) -> dict[str, Any]:
    """The body's ``parameters`` object, empty when there is none."""
    parameters = (await _parameters(request)).get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequest("'parameters' must be a JSON object")
    return parameters


def _entries(entries: list[RepositoryEntry]) -> list[RepositoryIndexEntry]:
    return [
        RepositoryIndexEntry(name=e.name, version=e.version, state=e.state, reason=e.reason)
        for e in entries
    ]


@router.post("/index", openapi_extra=_body({"ready": {"type": "boolean"}}, {"ready": True}))
async def repository_index(request: Request, control: ControlDep) -> list[RepositoryIndexEntry]:
    """Every model of the repository and every served model, with its state. The body is
    empty or `{"ready": true}` (only the READY ones)."""
    ready = (await _parameters(request)).get("ready", False)
    if not isinstance(ready, bool):
        raise BadRequest("'ready' must be true or false")
    with control_errors():
        return _entries(await control.index(ready_only=ready))


@router.get("/index")
async def repository_index_get(
    control: ControlDep,
    ready: Annotated[bool, Query(description="Only the READY models.")] = False,
) -> list[RepositoryIndexEntry]:
    """The index, as POST /v2/repository/index answers it."""
    with control_errors():
        return _entries(await control.index(ready_only=ready))


@router.post("/models/{name}/load", response_class=Response, openapi_extra=_body(_PARAMETERS, {}))
async def load_model(request: Request, control: ControlDep, name: Name) -> Response:
    """Load the model from the repository, or reload it from its changed files when it is
    served (the old one answers until the new one is warm, then finishes what it holds).
    200 with an empty body once it serves; 400 with the cause when it cannot load, leaving
    what was served as it was."""
    check_load_parameters(await _parameters_of(request))
    with control_errors():
        await control.load(name)
    return Response(status_code=200)


@router.post(
    "/models/{name}/unload",
    response_class=Response,
    openapi_extra=_body(_PARAMETERS, {"parameters": {"unload_dependents": False}}),
)
async def unload_model(request: Request, control: ControlDep, name: Name) -> Response:
    """Stop serving the model: new requests for it get 404 at once, the ones it accepted are
    answered, then it is freed. 200 with an empty body when done. `unload_dependents` is
    accepted and has nothing to do (evalserve has no ensembles)."""
    await _parameters_of(request)
    with control_errors():
        await control.unload(name)
    return Response(status_code=200)
