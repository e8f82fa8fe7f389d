// The page's one message line (role="alert"): what went wrong, in words.

import { explain } from "./api.js";

const message = document.getElementById("message");

export function showError(error) {
  message.textContent = explain(error);
  message.hidden = false;
  if (error.status === 401) document.getElementById("key").focus();
}

export function clearError() {
  message.hidden = true;
  message.textContent = "";
}

// Runs an async action started from the page (not a route), showing its error if it fails.
export async function attempt(action) {
  clearError();
  try {
    return await action();
  } catch (error) {
    showError(error);
  }
}
