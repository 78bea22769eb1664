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
