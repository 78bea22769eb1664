use tonic::Code;

use super::*;

#[test]
fn refusals_carry_the_grpc_code_name_and_its_http_status() {
    let r = Refusal::from(Status::invalid_argument("request body: unknown field `bogus`"));
    assert_eq!((r.0, r.1.code.as_str(), r.1.status), (StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", 400));
    let r = Refusal::from(Status::permission_denied("viewer"));
    assert_eq!((r.0, r.1.code.as_str()), (StatusCode::FORBIDDEN, "PERMISSION_DENIED"));
    assert_eq!(http_status(Code::Unauthenticated), StatusCode::UNAUTHORIZED);
    assert_eq!(http_status(Code::AlreadyExists), StatusCode::CONFLICT);
    assert_eq!(http_status(Code::ResourceExhausted), StatusCode::TOO_MANY_REQUESTS);
}

#[test]
fn a_followers_refusal_names_the_leader_in_its_body_and_a_header() {
    let mut s = Status::unavailable("coordinator c2 is not the leader: c1 at 10.0.0.1:7444 leads");
    s.metadata_mut().insert(crate::ha::LEADER_HEADER, "10.0.0.1:7444".parse().unwrap());
    let r = Refusal::from(s);
    assert_eq!(
        (r.0, r.1.code.as_str(), r.1.leader.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", "10.0.0.1:7444")
    );
    let response = r.into_response();
    assert_eq!(response.headers()[crate::ha::LEADER_HEADER], "10.0.0.1:7444");
    // Any other refusal names none.
    let r = Refusal::from(Status::not_found("no vm \"web-9\""));
    assert_eq!(r.1.leader, "");
    assert!(r.into_response().headers().get(crate::ha::LEADER_HEADER).is_none());
}
