"""Client side of the docker smoke test (deploy/smoke.sh): talks to the stack's front.

    python deploy/smoke_client.py first --url URL --state FILE [--replicas 2] [--poses 60]
    python deploy/smoke_client.py after-restart --url URL --state FILE

`first`: checks that the front spreads requests over every replica, that every replica
uses the shared store (Redis) and wants API keys, that a call without the key is
refused, registers the sample photo (the astronaut), then streams the recorded pose
track over the avatar's WebSocket from a replica other than the one that registered it
(so the avatar came from the shared store), one pose at a time, and checks every frame:
it decodes, has the bundle's size, echoes its sequence number, and is not blank. It
keeps the avatar id and a raw reference frame in FILE.

`after-restart`: the key still works, the avatar is still listed, and renders the
reference pose as before.

The API key comes from the environment variable AVATAR_API_KEY (deploy/smoke.sh makes
one with `avatar keys create` inside the stack).

Exit status 0 when every check passed; the log says what was checked and what failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from server.client import AvatarClient, PoseStream

REPO = Path(__file__).resolve().parent.parent

logger = logging.getLogger("smoke")

SAMPLE_PHOTO = REPO / "server" / "static" / "sample.jpg"
POSE_TRACK = REPO / "server" / "static" / "web" / "poses.json"
UPSTREAM_HEADER = "x-avatar-upstream"


class SmokeFailure(Exception):
    """A check failed; the message says what was expected and what came."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def wait_ready(url: str, replicas: int, timeout_s: float) -> dict:
    """Wait until /readyz through the front answers 200 from `replicas` distinct replicas;
    returns one /readyz body per replica."""
    deadline = time.monotonic() + timeout_s
    seen: dict[str, dict] = {}
    last = "no answer yet"
    with httpx.Client(base_url=url, timeout=10.0) as http:
        while time.monotonic() < deadline:
            try:
                response = http.get("/readyz")
                last = f"{response.status_code} {response.text[:200]}"
                if response.status_code == 200:
                    seen[response.headers.get(UPSTREAM_HEADER, "?")] = response.json()
                    if len(seen) >= replicas:
                        return seen
            except httpx.HTTPError as error:
                last = repr(error)
            time.sleep(0.5)
    raise SmokeFailure(
        f"front: expected {replicas} ready replicas within {timeout_s:.0f} s, "
        f"saw {len(seen)} ({sorted(seen)}); last answer: {last}"
    )


def check_spread(url: str, replicas: int, requests: int = 40) -> Counter:
    """GET /readyz through the front; every replica must answer some of them."""
    counts: Counter = Counter()
    with httpx.Client(base_url=url, timeout=10.0) as http:
        for _ in range(requests):
            response = http.get("/readyz")
            check(response.status_code == 200, f"/readyz: expected 200, got {response.status_code}")
            counts[response.headers.get(UPSTREAM_HEADER, "?")] += 1
    check(
        len(counts) >= replicas,
        f"front: expected requests spread over {replicas} replicas, got {dict(counts)}",
    )
    return counts


def check_replicas(ready: dict[str, dict], store: str) -> int:
    """Every replica serves the same bundle from the shared store, keys on; the image size."""
    for upstream, body in ready.items():
        kind = body.get("store", {}).get("kind")
        check(kind == store, f"replica {upstream}: expected store {store!r}, got {kind!r}")
        check(
            body.get("api_keys") is True,
            f"replica {upstream}: expected api_keys true, got {body.get('api_keys')!r}",
        )
    sizes = {int(body["weights"]["image_size"]) for body in ready.values()}
    check(len(sizes) == 1, f"replicas: expected one image size, got {sorted(sizes)}")
    return sizes.pop()


def check_refused_without_key(url: str) -> None:
    """The avatar routes want a key: none gives 401 `unauthorized`."""
    with httpx.Client(base_url=url, timeout=10.0) as http:
        response = http.get("/avatars")
    code = response.json().get("code") if response.status_code < 500 else None
    check(
        response.status_code == 401 and code == "unauthorized",
        f"GET /avatars without a key: expected 401 unauthorized, "
        f"got {response.status_code} {response.text[:200]}",
    )


def open_stream_elsewhere(
    client: AvatarClient, avatar_id: str, avoid: str, tries: int = 30
) -> tuple[PoseStream, str]:
    """A stream of the avatar, served by a replica other than `avoid` if one takes it."""
    for attempt in range(tries):
        stream = client.stream(avatar_id, format="jpeg", quality=90)
        upstream = stream.socket.response.headers.get(UPSTREAM_HEADER, "?")
        if upstream != avoid or attempt == tries - 1:
            return stream, upstream
        stream.close()
    raise SmokeFailure("stream: no attempt made")


def stream_poses(stream: PoseStream, poses: np.ndarray, size: int) -> list[float]:
    """Send each pose, wait for its frame, check it; returns per-frame round trips (ms)."""
    round_trips = []
    for seq, pose in enumerate(poses):
        started = time.perf_counter()
        stream.send_pose(seq, pose.reshape(68, 2), normalised=True)
        frame = stream.receive_frame(timeout=60.0)
        round_trips.append((time.perf_counter() - started) * 1000.0)

        check(frame.seq == seq, f"frame {seq}: expected seq {seq}, got {frame.seq}")
        check(
            frame.image.shape == (size, size, 3) and frame.image.dtype == np.uint8,
            f"frame {seq}: expected uint8 [{size}, {size}, 3], "
            f"got {frame.image.dtype} {list(frame.image.shape)}",
        )
        spread = float(frame.image.std())
        check(spread > 1.0, f"frame {seq}: blank image (pixel std {spread:.2f})")
    return round_trips


def reference_frame(client: AvatarClient, avatar_id: str, pose: np.ndarray) -> np.ndarray:
    """The avatar in one pose, as raw RGB through a fresh stream."""
    with client.stream(avatar_id, format="raw") as stream:
        stream.send_pose(0, pose.reshape(68, 2), normalised=True)
        frame = stream.receive_frame(timeout=60.0)
    return frame.image.astype(np.float32)


def load_poses(count: int) -> np.ndarray:
    track = np.asarray(json.loads(POSE_TRACK.read_text())["frames"], dtype=np.float32)
    check(
        track.ndim == 2 and track.shape[1] == 136,
        f"pose track: expected [N, 136], got {list(track.shape)}",
    )
    reps = -(-count // len(track))
    return np.concatenate([track] * reps)[:count]  # [count, 136]


def run_first(args: argparse.Namespace) -> dict:
    ready = wait_ready(args.url, args.replicas, args.ready_timeout)
    size = check_replicas(ready, args.store)
    runtimes = sorted({body["runtime"]["name"] for body in ready.values()})
    logger.info(
        "front ready: %d replicas, runtime %s, store %s, keys on, image size %d",
        len(ready),
        "/".join(runtimes),
        args.store,
        size,
    )
    check_refused_without_key(args.url)
    logger.info("a call without the API key is refused (401 unauthorized)")

    counts = check_spread(args.url, args.replicas)
    logger.info(
        "front spread %d requests over %d replicas: %s",
        sum(counts.values()),
        len(counts),
        dict(counts),
    )

    with AvatarClient(args.url, timeout=120.0, api_key=args.api_key) as client:
        # register through the front
        started = time.perf_counter()
        response = client.http.post(
            "/avatars",
            files={"image": (SAMPLE_PHOTO.name, SAMPLE_PHOTO.read_bytes(), "image/jpeg")},
        )
        check(
            response.status_code == 201,
            f"POST /avatars: expected 201, got {response.status_code} {response.text[:300]}",
        )
        avatar = response.json()
        registered_by = response.headers.get(UPSTREAM_HEADER, "?")
        check(
            avatar.get("image_size") == size,
            f"avatar: expected image_size {size}, got {avatar.get('image_size')}",
        )
        logger.info(
            "registered avatar %s via %s in %.0f ms",
            avatar["id"],
            registered_by,
            (time.perf_counter() - started) * 1000.0,
        )

        # stream from another replica: the avatar must come from the shared store
        poses = load_poses(args.poses)
        stream, streamed_by = open_stream_elsewhere(client, avatar["id"], registered_by)
        with stream:
            check(
                args.replicas < 2 or streamed_by != registered_by,
                f"stream: expected a replica other than {registered_by}, got {streamed_by}",
            )
            round_trips = stream_poses(stream, poses, size)
            ready_event = stream.ready or {}
        logger.info(
            "streamed %d poses via %s: %d frames checked (%dx%d jpeg), round trip "
            "median %.1f ms, max %.1f ms",
            len(poses),
            streamed_by,
            len(round_trips),
            size,
            size,
            float(np.median(round_trips)),
            max(round_trips),
        )
        check(
            ready_event.get("type") == "ready", f"stream: expected a ready event, got {ready_event}"
        )

        reference = reference_frame(client, avatar["id"], poses[0])

    state = {
        "avatar_id": avatar["id"],
        "image_size": size,
        "pose": poses[0].tolist(),
        "reference": reference.astype(np.uint8).tolist(),
        "registered_by": registered_by,
        "streamed_by": streamed_by,
        "frames": len(round_trips),
        "round_trip_ms_median": float(np.median(round_trips)),
    }
    args.state.write_text(json.dumps(state))
    return state


def run_after_restart(args: argparse.Namespace) -> dict:
    state = json.loads(args.state.read_text())
    check_replicas(wait_ready(args.url, args.replicas, args.ready_timeout), args.store)

    with AvatarClient(args.url, timeout=120.0, api_key=args.api_key) as client:
        listed = [a["id"] for a in client.list_avatars()]
        check(
            state["avatar_id"] in listed,
            f"after restart: expected avatar {state['avatar_id']} listed, got {listed}",
        )
        avatar = client.get_avatar(state["avatar_id"])
        logger.info("the key still works; avatar %s still there after the restart", avatar["id"])

        # the same pose renders the same frame: the stored state came back intact
        pose = np.asarray(state["pose"], dtype=np.float32)
        frame = reference_frame(client, state["avatar_id"], pose)
        before = np.asarray(state["reference"], dtype=np.float32)
        check(
            frame.shape == before.shape,
            f"after restart: expected frame {list(before.shape)}, got {list(frame.shape)}",
        )
        difference = float(np.abs(frame - before).mean())
        check(
            difference < 1.0,
            f"after restart: expected the same frame (mean abs diff < 1), got {difference:.2f}",
        )
        logger.info("reference pose renders as before the restart (mean abs diff %.3f)", difference)

        # and it still streams
        with client.stream(state["avatar_id"], format="jpeg") as stream:
            stream_poses(stream, np.stack([pose] * 5), state["image_size"])
        logger.info("streamed 5 more frames after the restart")
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["first", "after-restart"])
    parser.add_argument("--url", required=True, help="The front, e.g. http://127.0.0.1:8080")
    parser.add_argument("--state", type=Path, required=True, help="State file between phases")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--poses", type=int, default=60)
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--store", default="redis", help="Store kind every replica must use")
    args = parser.parse_args(argv)
    args.api_key = os.environ.get("AVATAR_API_KEY") or None
    if args.api_key is None:
        parser.error("AVATAR_API_KEY: expected an API key of the stack, got nothing")

    logging.basicConfig(
        level=logging.INFO, format="[smoke-client %(asctime)s] %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        if args.phase == "first":
            run_first(args)
        else:
            run_after_restart(args)
    except SmokeFailure as failure:
        logger.error("FAILED: %s", failure)
        return 1
    logger.info("%s: every check passed", args.phase)
    return 0


if __name__ == "__main__":
    sys.exit(main())
