#!/usr/bin/env bash
# Downloads the three public Korean corpora (NSMC, Korean HateSpeech, Korean UnSmile) from their
# GitHub sources into DEST, with the same layout and bytes as the staged shared/data copy.
# Every file is pinned by sha256; see usage() for the options.
set -euo pipefail

PROG=fetch-corpora

usage() {
    cat <<'EOF'
Usage: scripts/fetch-corpora.sh [DEST]

Downloads NSMC, Korean HateSpeech (BEEP!) and Korean UnSmile from GitHub into DEST
(default: data/corpora, relative to the current directory). Every file is checked
against a pinned sha256 and renamed into place only when it matches; files already
present with the right checksum are skipped. Stops at the first failure.
The result works as `--data_path DEST` for training.

Not fetched: the unlabeled Korean HateSpeech files 1-4
(unlabeled/unlabeled_comments_{1,2,3,4}.txt and their news_title files, 2,000,000
comments) exist upstream but are not pinned here; only file 5 (33,893 comments) is.

Environment:
  KORMLM_CORPORA_MIRROR  base URL (default https://raw.githubusercontent.com);
                         files are fetched from MIRROR/OWNER/REPO/REF/PATH
  KORMLM_NSMC_REF        ref of e9t/nsmc (default master)
  KORMLM_KHS_REF         ref of kocohub/korean-hate-speech (default master)
  KORMLM_UNSMILE_REF     ref of smilegate-ai/korean_unsmile_dataset (default main)

Needs curl (or python3) and sha256sum (or shasum, or python3).
EOF
}

usage_error() {
    echo "$PROG: $*" >&2
    echo "Try 'scripts/fetch-corpora.sh --help'." >&2
    exit 2
}

die() {
    echo "$PROG: error: $*" >&2
    exit 1
}

DEST=
while [ $# -gt 0 ]; do
    case $1 in
        -h | --help)
            usage
            exit 0
            ;;
        --)
            shift
            [ $# -le 1 ] || usage_error "too many arguments"
            DEST=${1:-}
            break
            ;;
        -*) usage_error "unknown option: $1" ;;
        *)
            [ -z "$DEST" ] || usage_error "too many arguments"
            DEST=$1
            ;;
    esac
    shift
done
DEST=${DEST:-data/corpora}

MIRROR=${KORMLM_CORPORA_MIRROR:-https://raw.githubusercontent.com}
MIRROR=${MIRROR%/}
# The pinned checksums are of the files at these commits (the latest on each branch when staged):
# e9t/nsmc cc0670e8 (2016-06-28), kocohub/korean-hate-speech f8d05dce (2020-07-18),
# smilegate-ai/korean_unsmile_dataset 569ab5f4 (2022-04-08). If a branch moves on and a
# checksum stops matching, set the ref to the full commit id.
NSMC_REF=${KORMLM_NSMC_REF:-master}
KHS_REF=${KORMLM_KHS_REF:-master}
UNSMILE_REF=${KORMLM_UNSMILE_REF:-main}

# dataset dir | OWNER/REPO | ref | path (same in the repo and under the dataset dir) | sha256
FILES="
nsmc e9t/nsmc $NSMC_REF ratings.txt 7d1d8e66323eb5a64feb2e299178f58827d8302111c434195dfeef48506e1256
nsmc e9t/nsmc $NSMC_REF ratings_train.txt e03b7d14e9e41be8d464a28057cd25d7396c53e67aa7fd5f7e552c59b0ee2940
nsmc e9t/nsmc $NSMC_REF ratings_test.txt 8ac9f64052f11dbf6ae0acb5e038f03d90a76f0eda7820cfb3a92d02edfcebda
nsmc e9t/nsmc $NSMC_REF synopses.json b9b5af304ff16b7901c5180cc49dc0750c4e8224558fb2a718e13e60c86551dd
korean-hate-speech kocohub/korean-hate-speech $KHS_REF labeled/train.tsv ebebacdcd023af2c4acc8c0a37695fb6433ac04fc009feff8f222724e303a5a9
korean-hate-speech kocohub/korean-hate-speech $KHS_REF labeled/dev.tsv 232b615d6e359a9d31dfb8370f32e1733dc5bb3f9c5430d34d7fcc7ba4b7e8ef
korean-hate-speech kocohub/korean-hate-speech $KHS_REF test.no_label.tsv 87190f1fe55db520bbcf3958943714ebc0366be508f6ce6a0fe456a8241a4e1a
korean-hate-speech kocohub/korean-hate-speech $KHS_REF news_title/train.news_title.txt 80fcb349633ddf38062c17363f18e62b3e533640c2a31ba50468963ff5db1492
korean-hate-speech kocohub/korean-hate-speech $KHS_REF news_title/dev.news_title.txt 5332b771458697677396a6bae8de0f590be9b4b8718592d6e1a92b6592b5d47f
korean-hate-speech kocohub/korean-hate-speech $KHS_REF news_title/test.news_title.txt 5dc930ee17d4068b1b62f7f4fab1857504b9009b4f8a37adcebbf99003c52508
korean-hate-speech kocohub/korean-hate-speech $KHS_REF news_title/unlabeled_comments.news_title_5.txt 4ea67b9fa80fe8611dab77b14b814275812ee8df68fb99a5f8ffd8cc69cae846
korean-hate-speech kocohub/korean-hate-speech $KHS_REF unlabeled/unlabeled_comments_5.txt e224a1d545c2729d8f9828429af0f6ee34cd9a4ac5861c7a12d4f32b9a9ed641
korean_unsmile_dataset smilegate-ai/korean_unsmile_dataset $UNSMILE_REF unsmile_train_v1.0.tsv f560a2f624d98f7cd9dc5ec6e5368efb7edd9bfc01cfa963538facfad9fc6001
korean_unsmile_dataset smilegate-ai/korean_unsmile_dataset $UNSMILE_REF unsmile_valid_v1.0.tsv b391af71ab352eea27cecac0ff059fe2ed72d7c99585c10e86ce77a75bd12e42
"

have() { command -v "$1" >/dev/null 2>&1; }

if have curl; then
    fetch() { curl -fsSL --retry 3 -o "$2" "$1"; }
elif have python3; then
    fetch() {
        python3 -c '
import shutil, sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=60) as r, open(sys.argv[2], "wb") as f:
        shutil.copyfileobj(r, f)
except Exception as e:
    sys.exit("python3 urllib: %s" % e)
' "$1" "$2"
    }
else
    die "downloading needs curl or python3; install one of them"
fi

if have sha256sum; then
    sha256() { sha256sum "$1" | cut -d' ' -f1; }
elif have shasum; then
    sha256() { shasum -a 256 "$1" | cut -d' ' -f1; }
elif have python3; then
    sha256() {
        python3 -c '
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())
' "$1"
    }
else
    die "checking files needs sha256sum, shasum or python3; install one of them"
fi

# The temporary file being downloaded, removed on any exit that leaves it behind.
TMP=
trap '[ -z "$TMP" ] || rm -f -- "$TMP"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

downloaded=0
current=0
while read -r dataset repo ref path expected; do
    [ -n "$dataset" ] || continue
    name=$dataset/$path
    target=$DEST/$name
    url=$MIRROR/$repo/$ref/$path
    if [ -f "$target" ] && [ "$(sha256 "$target")" = "$expected" ]; then
        echo "up to date  $name"
        current=$((current + 1))
        continue
    fi
    dir=$(dirname "$target")
    mkdir -p "$dir" || die "cannot create $dir"
    TMP=$(mktemp "$dir/.$(basename "$path").part.XXXXXX") || die "cannot create a temporary file in $dir"
    if ! fetch "$url" "$TMP"; then
        rm -f -- "$TMP"
        die "download failed for $name from $url"
    fi
    actual=$(sha256 "$TMP")
    if [ "$actual" != "$expected" ]; then
        rm -f -- "$TMP"
        die "checksum mismatch for $name from $url
  expected sha256 $expected
  actual   sha256 $actual"
    fi
    chmod "$(printf '%o' $((0666 & ~0$(umask))))" "$TMP" # mktemp made it 0600
    mv -f -- "$TMP" "$target"
    TMP=
    echo "downloaded  $name"
    downloaded=$((downloaded + 1))
done <<<"$FILES"

cat <<EOF

$downloaded downloaded, $current up to date: all $((downloaded + current)) files verified in $DEST
Train on them with: --data_path $DEST

Licences (they travel with the data; keep them when you share it):
  nsmc/                    CC0 1.0 (public domain dedication); github.com/e9t/nsmc
  korean-hate-speech/      CC BY-SA 4.0: attribution required and derived data must be shared
                           under the same licence. Cite Moon, Cho & Lee, "BEEP! Korean Corpus of
                           Online News Comments for Toxic Speech Detection", SocialNLP@ACL 2020.
  korean_unsmile_dataset/  CC BY-NC-ND 4.0: non-commercial use only (ask smilegate_ai@smilegate.com
                           otherwise), no redistribution of modified files. Cite "Korean UnSmile
                           dataset" (Smilegate AI, 2022) and Kang et al. 2022, arXiv:2204.03262.

Not fetched: the unlabeled Korean HateSpeech files 1-4 (2,000,000 comments) exist upstream
(kocohub/korean-hate-speech unlabeled/unlabeled_comments_{1,2,3,4}.txt) but are not pinned here.
EOF
