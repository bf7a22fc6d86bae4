"""`--push_to_hub REPO`: upload an export folder to the Hugging Face Hub with `huggingface_hub`.

The token is read from the HF_TOKEN environment variable and handed to the client for this upload
only: sftkit never logs in (which would write the token to ~/.cache/huggingface) and never prints it.
Network and permission failures become an ExportError that says what to check, not a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

from sftkit.errors import SftkitError


class HubError(SftkitError):
    """The upload to the Hub failed; the message says what to check."""


def upload_folder(folder: Path, repo: str) -> str:
    """Create `repo` (private if new) and upload `folder` into it; returns the repo's URL."""
    try:
        from huggingface_hub import HfApi, errors
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
    except ImportError:
        raise HubError(
            f"--push_to_hub needs huggingface_hub: pip install 'sftkit[hub]'; the export itself is in {folder}"
        ) from None
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise HubError(
            f"--push_to_hub {repo}: no HF_TOKEN in the environment; create a token with write access at "
            f"https://huggingface.co/settings/tokens and run with HF_TOKEN=... set (the export is in {folder})"
        )
    # The HTTP client's own error base (httpx's HTTPError), which connect and DNS failures derive from.
    transport_error = getattr(errors, "HTTPError", OSError)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo, private=True, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="Upload from sftkit export")
    except OfflineModeIsEnabled:
        raise HubError(
            f"--push_to_hub {repo}: HF_HUB_OFFLINE is set, so nothing was uploaded; unset it and rerun "
            f"(the export is in {folder})"
        ) from None
    except HFValidationError as err:
        raise HubError(f"--push_to_hub {repo}: not a valid repo id ({err}); use OWNER/NAME") from None
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        why = (
            "the token is invalid or has no write access to it"
            if status in (401, 403)
            else f"the Hub answered {status or 'with an error'}"
        )
        raise HubError(f"--push_to_hub {repo}: {why}; the export is in {folder}") from None
    except (OSError, transport_error) as err:  # no network: connect errors, DNS
        raise HubError(
            f"--push_to_hub {repo}: cannot reach the Hub ({type(err).__name__}: {err}); check the network and "
            f"rerun, or upload {folder} later with `hf upload {repo} {folder}`"
        ) from None
    return str(url)
