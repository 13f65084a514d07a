// A Function URL handler that streams its answer (FUNCTION_URL_INVOKE_MODE=RESPONSE_STREAM).
// awslambda.HttpResponseStream.from sends the status, headers and cookies first (as AWS's
// HTTP-integration prelude); then each write reaches the caller as it is made.
//   ?n=5        how many lines        ?gap_ms=300  the pause between them
//   ?status=200 the HTTP status       ?fail=1      throw after the first line
export const handler = awslambda.streamifyResponse(async (event, responseStream) => {
  const query = event.queryStringParameters || {};
  const stream = awslambda.HttpResponseStream.from(responseStream, {
    statusCode: Number(query.status || 200),
    headers: { "content-type": "text/plain; charset=utf-8", "x-request-path": event.rawPath },
    cookies: ["visits=1; Path=/", `last=${encodeURIComponent(event.rawPath)}; HttpOnly`],
  });
  const lines = Number(query.n || 5);
  for (let i = 1; i <= lines; i++) {
    stream.write(`line ${i} of ${lines}\n`);
    if (query.fail) {
      throw new Error("failed after the first line");
    }
    await new Promise((resolve) => setTimeout(resolve, Number(query.gap_ms || 300)));
  }
  stream.end();
});
