"""Parses a Prometheus text exposition (stdin) with the official Python client's parser
(prometheus_client.parser.text_string_to_metric_families) and prints it as JSON:
{"families": {name: {"type": ..., "documentation": ..., "samples": [{"name", "labels", "value"}]}}}.
A text the parser rejects exits non-zero with its error."""

import json
import math
import sys

from prometheus_client.parser import text_string_to_metric_families


def main():
    text = sys.stdin.read()
    families = {}
    for family in text_string_to_metric_families(text):
        if family.name in families:
            sys.exit(f"family {family.name} appears twice")
        families[family.name] = {
            "type": family.type,
            "documentation": family.documentation,
            "samples": [
                {
                    "name": s.name,
                    "labels": s.labels,
                    # JSON has no NaN/Inf: they are spelled as strings.
                    "value": s.value if math.isfinite(s.value) else repr(s.value),
                }
                for s in family.samples
            ],
        }
    json.dump({"families": families}, sys.stdout)


if __name__ == "__main__":
    main()
