#!/usr/bin/env bash
# The original design's container script (see shared/seed/SUMMARY.md), re-implemented for the
# benchmark: one message at a time from the intake queue, deleted at once, then clone --depth 10,
# checkout, rm -rf .git, zip -r, the late protected-branch check, aws s3 cp, aws codebuild
# start-build with the original's overrides. The one deliberate change: variables are quoted
# (the original's injection bug would change nothing about its speed).
#
# Where the original ran one Fargate task per push, this runs the same steps in a loop, so the
# benchmark does not charge it the 30-90 s task start. The loop is bounded: it stops after
# MAX_MESSAGES messages or MAX_RECEIVES receives.
#
# Environment: QUEUE_URL, CODE_BUCKET, GIT_URL_PREFIX (the URL of a repository minus its name),
# WORK_DIR, and optionally AWS (the CLI), WAIT_TIME, MAX_MESSAGES, MAX_RECEIVES, plus the AWS_*
# and GIT_SSH_COMMAND variables the CLI and git need.
set -euo pipefail

: "${QUEUE_URL:?}" "${CODE_BUCKET:?}" "${GIT_URL_PREFIX:?}" "${WORK_DIR:?}"
AWS=${AWS:-aws}
WAIT_TIME=${WAIT_TIME:-20}
MAX_MESSAGES=${MAX_MESSAGES:-1}
MAX_RECEIVES=${MAX_RECEIVES:-$((MAX_MESSAGES + 10))}

# The CLI (AWS CLI v1) ignores AWS_ENDPOINT_URL*, so the emulator's endpoints are passed as
# --endpoint-url; against AWS they are unset and the CLI's defaults apply.
aws_at() {
    local endpoint=$1
    shift
    if [ -n "$endpoint" ]; then
        "$AWS" --endpoint-url "$endpoint" "$@"
    else
        "$AWS" "$@"
    fi
}
sqs() { aws_at "${AWS_ENDPOINT_URL_SQS:-${AWS_ENDPOINT_URL:-}}" sqs "$@"; }
s3() { aws_at "${AWS_ENDPOINT_URL_S3:-${AWS_ENDPOINT_URL:-}}" s3 "$@"; }
codebuild() { aws_at "${AWS_ENDPOINT_URL_CODEBUILD:-${AWS_ENDPOINT_URL:-}}" codebuild "$@"; }

if command -v jq >/dev/null; then
    field() { jq -r "$1"; }
else  # the original image had jq; python3 stands in where it is missing
    field() { python3 -c 'import json,sys
value = json.load(sys.stdin)
for part in sys.argv[1].lstrip(".").replace("[0]", ".0").split("."):
    value = value[int(part)] if part.isdigit() else value[part]
print(value)' "$1"; }
fi

processed=0
for ((receive = 0; receive < MAX_RECEIVES && processed < MAX_MESSAGES; receive++)); do
    message=$(sqs receive-message --queue-url "$QUEUE_URL" \
        --max-number-of-messages 1 --wait-time-seconds "$WAIT_TIME" --output json)
    [ -n "$message" ] || continue
    receipt=$(field '.Messages[0].ReceiptHandle' <<<"$message")
    body=$(field '.Messages[0].Body' <<<"$message")
    # The original deletes the message before doing any work.
    sqs delete-message --queue-url "$QUEUE_URL" --receipt-handle "$receipt"
    processed=$((processed + 1))

    repository=$(field '.detail.repositoryName' <<<"$body")
    commit=$(field '.detail.commitId' <<<"$body")
    branch=$(field '.detail.referenceName' <<<"$body")

    dir=$(mktemp -d -p "$WORK_DIR")
    git clone --quiet --depth 10 --branch "$branch" "$GIT_URL_PREFIX$repository" "$dir/src"
    (
        cd "$dir/src"
        git -c advice.detachedHead=false checkout --quiet "$commit"
        rm -rf .git
        zip -q -r "$dir/$commit.zip" .
    )
    # The original checks the protected branches only after the clone and the zip.
    case "$branch" in
        test | develop | staging)
            rm -rf "$dir"
            continue
            ;;
    esac
    key="$repository/$branch/$commit.zip"
    s3 cp --quiet "$dir/$commit.zip" "s3://$CODE_BUCKET/$key"
    codebuild start-build --project-name "$repository" \
        --source-type-override S3 --source-location-override "$CODE_BUCKET/$key" \
        --environment-variables-override "name=COMMIT_ID,value=$commit,type=PLAINTEXT" \
        --artifacts-override type=NO_ARTIFACTS >/dev/null
    rm -rf "$dir"
done
echo "processed $processed message(s)"
