"""Put records on a Kinesis Data Firehose stream with ONE client per process, rebuilt before its credentials expire.

``build_firehose_client`` is pure (one AssumeRole, one client) and runs only through ``CachedClient``:
once per process and credential lifetime, never per put (see README, "What keeps memory flat").

Records are ``json.dumps(record) + "\\n"``: Firehose concatenates records into S3 objects, and the newline
lets readers (Snowflake, Athena) split them again. A record over Firehose's 1,000 KiB limit is refused
here with ``FirehoseRecordTooLarge`` before any network call; callers that can shrink their records
(the logging hook) do so first, using ``encode_record`` and ``MAX_RECORD_BYTES``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from gateways.aws import StaticCredentials, make_client, new_session
from gateways.cached_client import CachedClient, ClientUnavailable, Clock, utcnow
from gateways.errors import GatewayError, release_exception

logger = logging.getLogger(__name__)

#: Firehose's limit for one record's data (before base64), in bytes: 1,000 KiB.
MAX_RECORD_BYTES = 1000 * 1024
#: The STS session name, visible in CloudTrail as the role session of every put.
ROLE_SESSION_NAME = "celery-forwarder-logging"
#: Events a ``BuildObserver`` hears: a client was built, STS AssumeRole failed, or building failed otherwise.
CLIENT_BUILT, STS_FAILED, BUILD_FAILED = "client_built", "sts_failed", "build_failed"
#: ``observer(event, error_type)``: one of the events above, with the error's class name for a failure, else "".
BuildObserver = Callable[[str, str], None]


class FirehosePutError(GatewayError):
    """A record was not put: Firehose or the network refused it (non-200, botocore error)."""


class FirehoseUnavailable(FirehosePutError):
    """No Firehose client: building it failed (STS, credentials, region) or is backing off after a failure."""


class FirehoseRecordTooLarge(FirehosePutError):
    """The encoded record exceeds Firehose's per-record limit; nothing was sent."""


def encode_record(record: dict[str, Any]) -> bytes:
    """The bytes put for ``record``: JSON, newline-terminated (one record per line in S3)."""
    return (json.dumps(record, default=str) + "\n").encode("utf-8")


def build_firehose_client(
    role_arn: str, session_duration: int, max_pool_connections: int, observer: BuildObserver | None = None
) -> tuple[Any, datetime | None]:
    """Build a Firehose client and return it with its credentials' expiry; pure (no shared state).

    With ``role_arn``: one ``sts.assume_role`` call, and a client using those temporary credentials;
    the expiry is the aware ``Credentials.Expiration``. Without: the default credential chain (which
    refreshes itself), and no expiry. ``observer`` hears the outcome (``CLIENT_BUILT``, ``STS_FAILED``
    or ``BUILD_FAILED``); it must not raise.

    Raises:
        botocore.exceptions.BotoCoreError, ClientError: STS or client construction failed.
    """
    tell: BuildObserver = observer or (lambda event, error_type: None)
    session = new_session()
    credentials, expiry = None, None
    if role_arn:
        try:
            credentials, expiry = _assume_role(session, role_arn, session_duration)
        except Exception as exc:
            tell(STS_FAILED, type(exc).__name__)
            raise
    try:
        client = make_client(
            "firehose", session=session, credentials=credentials, max_pool_connections=max_pool_connections
        )
    except Exception as exc:
        tell(BUILD_FAILED, type(exc).__name__)
        raise
    tell(CLIENT_BUILT, "")
    return client, expiry


def _assume_role(session: Any, role_arn: str, session_duration: int) -> tuple[StaticCredentials, datetime]:
    """One AssumeRole call: the temporary credentials and their aware expiry."""
    sts = make_client("sts", session=session, max_pool_connections=1)
    try:
        answer = sts.assume_role(
            RoleArn=role_arn, RoleSessionName=ROLE_SESSION_NAME, DurationSeconds=session_duration
        )
    finally:
        sts.close()
    creds = answer["Credentials"]
    return StaticCredentials(creds["AccessKeyId"], creds["SecretAccessKey"], creds["SessionToken"]), creds["Expiration"]


class FirehoseGateway:
    """``put_record`` on one delivery stream through a per-process cached client.

    Construction does no I/O: the client is built on the first put of each process.
    """

    def __init__(
        self,
        stream_name: str,
        *,
        role_arn: str,
        session_duration: int,
        leeway: timedelta,
        max_pool_connections: int,
        clock: Clock = utcnow,
    ) -> None:
        self.stream_name = stream_name
        self.role_arn = role_arn
        #: Who hears each client build and its failures (``observe``); none by default.
        self.observers: list[BuildObserver] = []
        #: The process's Firehose client; ``client_cache.builds`` counts builds in this process.
        self.client_cache: CachedClient[Any] = CachedClient(
            "firehose",
            lambda: build_firehose_client(role_arn, session_duration, max_pool_connections, self._tell),
            leeway=leeway,
            clock=clock,
        )

    def put_record(self, record: dict[str, Any]) -> None:
        """Put one record (JSON, newline-terminated) on the stream.

        Raises:
            FirehoseRecordTooLarge: the encoded record is over ``MAX_RECORD_BYTES`` (nothing sent).
            FirehoseUnavailable: no client could be built (or a failed build is backing off).
            FirehosePutError: Firehose answered non-200, or the call failed (after botocore's retries).
        """
        data = encode_record(record)
        if len(data) > MAX_RECORD_BYTES:
            raise FirehoseRecordTooLarge(
                f"record of {len(data)} bytes exceeds Firehose's {MAX_RECORD_BYTES}-byte limit; not sent"
            )
        client = self._client()
        try:
            answer = client.put_record(DeliveryStreamName=self.stream_name, Record={"Data": data})
        except (ClientError, BotoCoreError) as exc:
            raise FirehosePutError(f"put_record to {self.stream_name} failed: {_describe(exc)}") from exc
        status = answer.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status != 200:
            raise FirehosePutError(f"put_record to {self.stream_name} answered HTTP {status}")
        logger.debug("firehose record %s put on %s", answer.get("RecordId"), self.stream_name)

    def observe(self, observer: BuildObserver) -> None:
        """Add an observer of client builds and their failures (metrics); one that raises is logged."""
        self.observers.append(observer)

    def close(self) -> None:
        """Close this process's client (the next put builds a new one)."""
        self.client_cache.close()

    def _tell(self, event: str, error_type: str) -> None:
        for observer in self.observers:
            try:
                observer(event, error_type)
            except Exception as exc:  # an observer must not change what the gateway does
                logger.warning("firehose build observer failed: %s: %s", type(exc).__name__, exc)
                release_exception(exc)

    def _client(self) -> Any:
        try:
            return self.client_cache.get()
        except ClientUnavailable as exc:
            raise FirehoseUnavailable(str(exc)) from None
        except Exception as exc:
            raise FirehoseUnavailable(f"cannot build the Firehose client: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    """One line naming the error, with AWS's code and message when there is one."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', 'ClientError')}: {error.get('Message', '')}".strip()
    return f"{type(exc).__name__}: {exc}"
