// The echo Lambda in Node.js: the result is the event, as in ../echo-lambda/echo.py.
export const handler = async (event, context) => {
  console.log(`echo ${context.awsRequestId}`);
  return event;
};

export const fail = async () => {
  throw new TypeError("failing on purpose");
};
