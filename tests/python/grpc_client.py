"""A generic Python gRPC client of the coordinator: health check, server reflection, and a
JobService client generated from proto/kormlm.proto with grpcio-tools.

usage: grpc_client.py HOST:PORT PROTO_DIR OUT_DIR
"""
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_tools import protoc


def main() -> None:
    addr, proto_dir, out_dir = sys.argv[1:4]
    channel = grpc.insecure_channel(addr)
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
    status = jobs.GetJobStatus(kormlm_pb2.GetJobStatusRequest(), timeout=5)
    print("status", status.job_id, kormlm_pb2.JobState.Name(status.state))
    listed = jobs.ListJobs(kormlm_pb2.ListJobsRequest(), timeout=5)
    print("jobs", len(listed.jobs))
    for update in jobs.WatchJob(kormlm_pb2.WatchJobRequest(job_id=status.job_id), timeout=5):
        print("watch", update.job_id, kormlm_pb2.JobState.Name(update.state), update.progress.global_step)
        break


if __name__ == "__main__":
    main()
