// Small helpers shared by the client tests.

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Resolve with the next event `type` from `emitter` (a RealtimeClient or a
 * Subscription) for which `pred(...args)` is true; reject after `timeout` ms.
 */
export function once(emitter, type, pred = () => true, timeout = 5000) {
  return new Promise((resolve, reject) => {
    const handler = (...args) => {
      if (!pred(...args)) return;
      clearTimeout(timer);
      emitter.off(type, handler);
      resolve(args.length > 1 ? args : args[0]);
    };
    const timer = setTimeout(() => {
      emitter.off(type, handler);
      reject(new Error(`timed out after ${timeout} ms waiting for '${type}'`));
    }, timeout);
    emitter.on(type, handler);
  });
}

/** Record every event `type` of `emitter` into an array. */
export function record(emitter, type) {
  const seen = [];
  emitter.on(type, (x) => seen.push(x));
  return seen;
}

/** Poll `cond` until it is true; reject after `timeout` ms. */
export async function until(cond, timeout = 5000, what = 'condition') {
  const deadline = Date.now() + timeout;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await sleep(10);
  }
}

/** A unique channel name for one test. */
let n = 0;
export function channelName(prefix = 'test') {
  n += 1;
  return `${prefix}:t${process.pid}-${Date.now().toString(36)}-${n}`;
}
