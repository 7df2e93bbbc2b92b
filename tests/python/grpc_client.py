"""A generic Python gRPC client of the coordinator: health check, server reflection, and a
JobService client generated from proto/kormlm.proto with grpcio-tools. The token is read from the
coordinator's STATE_DIR/token and sent in the `x-kormlm-token` metadata; an https:// URL is
verified against CA_PEM.

usage: grpc_client.py URL PROTO_DIR OUT_DIR STATE_DIR [CA_PEM]
"""
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_tools import protoc


def main() -> None:
    url, proto_dir, out_dir, state_dir = sys.argv[1:5]
    ca = sys.argv[5] if len(sys.argv) > 5 else None
    with open(os.path.join(state_dir, "token"), encoding="ascii") as f:
        token = f.read().strip()
    auth = [("x-kormlm-token", token)]
    if url.startswith("https://"):
        with open(ca, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        channel = grpc.secure_channel(url.removeprefix("https://"), credentials)
        print("tls on")
    else:
        channel = grpc.insecure_channel(url.removeprefix("http://"))
    grpc.channel_ready_future(channel).result(timeout=10)

    health = health_pb2_grpc.HealthStub(channel)
    for service in ["", "kormlm.v1.JobService", "kormlm.v1.WorkerService"]:
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        print("health", health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status), repr(service))

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    for response in responses:
        for service in response.list_services_response.service:
            print("reflection", service.name)

    os.makedirs(out_dir, exist_ok=True)
    rc = protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", "kormlm.proto"])
    if rc != 0:
        raise SystemExit(f"protoc failed with {rc}")
    sys.path.insert(0, out_dir)
    import kormlm_pb2
    import kormlm_pb2_grpc

    jobs = kormlm_pb2_grpc.JobServiceStub(channel)
    try:
        jobs.GetJobStatus(kormlm_pb2.GetJobStatusRequest(), timeout=5)
        print("without token: answered")
    except grpc.RpcError as e:
        print("without token:", e.code().name)
    status = jobs.GetJobStatus(kormlm_pb2.GetJobStatusRequest(), timeout=5, metadata=auth)
    print("status", status.job_id, kormlm_pb2.JobState.Name(status.state))
    listed = jobs.ListJobs(kormlm_pb2.ListJobsRequest(), timeout=5, metadata=auth)
    print("jobs", len(listed.jobs))
    for update in jobs.WatchJob(kormlm_pb2.WatchJobRequest(job_id=status.job_id), timeout=5, metadata=auth):
        print("watch", update.job_id, kormlm_pb2.JobState.Name(update.state), update.progress.global_step)
        break


if __name__ == "__main__":
    main()
